"""A group member that gives up on running callbacks says so, with the wait it really applied.

A member waits for callbacks at most ``lease_ttl / 3`` at stop (``lease_ttl / 6`` at a
rebalance), far less than ``stop()``'s timeout: what it gives up on is delivered again by the
partition's next owner, maybe while it still runs here. ``stop()`` raises that, naming the cap;
``run_forever()`` and a rebalance log it at WARNING. The start log names the group's keys.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pymongo
import pytest

import mongo_events as me
from mongo_events.groups import partition_of

from ..conftest import wait_for
from ..helpers import FAST


class Blocked:
    """A callback that blocks until released, counting who entered it."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered: list[Any] = []
        self.lock = threading.Lock()

    def __call__(self, event: me.ChangeEvent) -> None:
        with self.lock:
            self.entered.append(event.document_id)
        self.release.wait(30)

    def count(self) -> int:
        with self.lock:
            return len(self.entered)


@pytest.fixture
def blocked() -> Iterator[Blocked]:
    callback = Blocked()
    yield callback
    callback.release.set()


@pytest.fixture
def members(client: pymongo.MongoClient[Any], blocked: Blocked) -> Iterator[Callable[..., me.Bus]]:
    buses: list[me.Bus] = []

    def make(name: str, **options: Any) -> me.Bus:
        opts = {**FAST, "group": "g", "partitions": 1, "lease_ttl": 3.0, "name": name, **options}
        bus = me.Bus(client.shop.orders, **opts)
        bus.subscribe(blocked, name="slow-one")
        buses.append(bus)
        return bus

    yield make
    blocked.release.set()
    for bus in buses:
        try:
            bus.stop(timeout=5)
        except me.ShutdownTimeout:
            pass


def held(bus: me.Bus) -> set[int]:
    status = bus.health().group
    assert status is not None
    return set(status.held)


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_stop_states_the_lease_ttl_cap_it_applied_not_its_timeout(
    members: Callable[..., me.Bus], client: pymongo.MongoClient[Any], blocked: Blocked
) -> None:
    # Given a member (lease_ttl=3) holding the partition, with a callback running
    bus = members("member").start()
    assert wait_for(lambda: held(bus) == {0}, timeout=10.0)
    client.shop.orders.insert_one({"_id": 1})
    assert wait_for(lambda: blocked.count() == 1, timeout=10.0)
    # When it is stopped with a 30 s timeout
    with pytest.raises(me.ShutdownTimeout) as info:
        bus.stop(timeout=30.0)
    # Then the error says the wait it applied and why it was capped, not "after 30.0s"
    error, message = info.value, str(info.value)
    assert "after 30.0s" not in message
    assert "lease_ttl / 3 = 1.0s" in message and "the stop's own timeout was 30.0s" in message
    assert error.waited is not None and error.waited < 30.0
    assert f"after {error.waited:.1f}s" in message
    assert len(error.running) == 1 and "'slow-one' on event" in error.running[0]
    assert "two members may handle the same document" in message


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_run_forever_on_a_member_warns_about_the_callbacks_it_gave_up_on(
    members: Callable[..., me.Bus],
    client: pymongo.MongoClient[Any],
    blocked: Blocked,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("run_forever() installs its signal handlers only in the main thread")
    bus = members("member", partitions=2)
    bus.start()
    assert wait_for(lambda: held(bus) == {0, 1}, timeout=10.0)
    ids = [next(i for i in range(100) if partition_of(i, 2) == p) for p in (0, 1)]

    def insert_then_signal() -> None:
        client.shop.orders.insert_many([{"_id": i} for i in ids])
        if wait_for(lambda: blocked.count() == 2, timeout=10.0):
            os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=insert_then_signal, daemon=True)
    # Given two callbacks that run far longer than a member's stop waits (lease_ttl / 3)
    with caplog.at_level(logging.INFO, logger="mongo_events"):
        sender.start()
        # When SIGTERM stops run_forever() (stop_timeout 30 s)
        bus.run_forever(stop_timeout=30.0)
    sender.join(10)
    assert blocked.count() == 2
    # Then one WARNING says how many, which, how long, why no longer, and what follows
    (message,) = _warnings(caplog, "still running")
    assert message.startswith("bus member: 2 callbacks were still running")
    assert message.count("'slow-one' on event") == 2
    assert re.search(r"after \d+\.\ds \(a consumer-group member waits at most lease_ttl / 3 = 1\.0s", message)
    assert "not checkpointed" in message and "two members may handle the same document" in message
    assert bus.state is me.BusState.STOPPED


def test_a_rebalance_that_gives_up_on_callbacks_warns(
    members: Callable[..., me.Bus],
    client: pymongo.MongoClient[Any],
    blocked: Blocked,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a member alone with both partitions, a callback running in each
    first = members("first", partitions=2, lease_ttl=1.5).start()
    assert wait_for(lambda: held(first) == {0, 1}, timeout=10.0)
    ids = [next(i for i in range(100) if partition_of(i, 2) == p) for p in (0, 1)]
    client.shop.orders.insert_many([{"_id": i} for i in ids])
    assert wait_for(lambda: blocked.count() == 2, timeout=10.0)
    with caplog.at_level(logging.WARNING, logger="mongo_events.groups.runtime"):
        # When a second member joins and the first releases one partition to it
        members("second", partitions=2, lease_ttl=1.5).start()
        found = wait_for(lambda: _warnings(caplog, "given up (a rebalance"), timeout=10.0)
    # Then the first says which callback it gave up on and that it may run twice
    assert found, [r.getMessage() for r in caplog.records]
    (message,) = found
    assert message.startswith("bus first: partition ")
    assert "1 callback(s) still ran" in message and "'slow-one' on event" in message
    assert "lease_ttl / 6 = 0.25s" in message
    assert "two members may handle the same document" in message


def test_the_start_log_names_the_groups_checkpoint_keys(
    members: Callable[..., me.Bus], caplog: pytest.LogCaptureFixture
) -> None:
    bus = members("member", partitions=4)
    assert bus.checkpoint_key_summary == "g:shop.orders#0..3"
    with caplog.at_level(logging.INFO, logger="mongo_events.bus"):
        bus.start()
    started = [r.getMessage() for r in caplog.records if " started: " in r.getMessage()]
    assert started == [
        "bus member started: watching shop.orders as a member of group g, checkpoint keys g:shop.orders#0..3"
    ]


def test_a_bus_without_a_group_keeps_its_single_key(client: pymongo.MongoClient[Any]) -> None:
    bus = me.Bus(client.shop.orders, resume_token_id="host")
    assert bus.checkpoint_key_summary == bus.resume_token_key == "shop.orders:host"
    one = me.Bus(client.shop.orders, group="g")
    assert one.checkpoint_key_summary == "g:shop.orders#0"
