"""Two live buses without a group writing one checkpoint key: an ERROR names both."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import pymongo
import pytest

import mongo_events as me

from ..conftest import wait_for
from ..helpers import Recorder


def _collisions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and "writes the same checkpoint" in r.getMessage()
    ]


def test_two_live_buses_sharing_a_checkpoint_key_are_named_in_an_error(
    client: pymongo.MongoClient[Any], make_bus: Callable[..., me.Bus], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="mongo_events")
    got = Recorder()
    buses = [make_bus(client.shop.orders, resume_token_id="shared", name=f"b{i}") for i in range(2)]
    for bus in buses:
        bus.subscribe(got.add)
        bus.start()
    for i in range(3):
        client.shop.orders.insert_one({"_id": i})
        got.wait(2 * (i + 1))
        for bus in buses:
            assert bus.flush()

    def reporters() -> set[str]:
        return {m.split(":", 1)[0] for m in _collisions(caplog)}

    # Each bus reports the other (the first report may come before the second's)
    assert wait_for(lambda: reporters() == {"bus b0", "bus b1"}, timeout=10), _collisions(caplog)
    message = _collisions(caplog)[0]
    assert "'shop.orders:shared'" in message
    # (host, pid) of the other writer, then of this one: here both live in this process
    assert message.count(f"{socket.gethostname()} (pid {os.getpid()})") == 2


def test_a_restarted_bus_is_not_a_collision(
    client: pymongo.MongoClient[Any], make_bus: Callable[..., me.Bus], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="mongo_events")
    for run in range(2):  # the second bus reads the first one's stamp: a predecessor, not a twin
        got = Recorder()
        bus = make_bus(client.shop.orders, resume_token_id="mine")
        bus.subscribe(got.add)
        bus.start()
        for i in range(2):
            client.shop.orders.insert_one({"_id": f"{run}-{i}"})
            got.wait(i + 1)
            assert bus.flush()
        bus.stop()
    stored = client.shop["_event_resume_tokens"].find_one({"_id": "shop.orders:mine"})
    assert stored is not None and stored["writer"]["pid"] == os.getpid()
    assert _collisions(caplog) == []
