"""A stop that gives up on running callbacks says so: raised by ``stop()``, logged otherwise.

``run_forever()`` (and a failure's or a failed start's shutdown) has nobody to raise
``ShutdownTimeout`` to: it must log a WARNING that names the callbacks, how long it waited
and that their events will be delivered again.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
from typing import Any

import pymongo
import pytest

import mongo_events as me

from .helpers import FAST


def _blocking_bus(
    client: pymongo.MongoClient[Any], entered: threading.Event, release: threading.Event
) -> me.Bus:
    bus = me.Bus(client.shop.orders, name="stop-warn", max_workers=2, **FAST)

    @bus.subscribe(name="slow-one")
    def slow(event: me.ChangeEvent) -> None:
        entered.set()
        release.wait(30)

    return bus


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_run_forever_stopped_by_a_signal_warns_about_the_callbacks_it_gave_up_on(
    client: pymongo.MongoClient[Any], caplog: pytest.LogCaptureFixture
) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("run_forever() installs its signal handlers only in the main thread")
    entered, release = threading.Event(), threading.Event()
    bus = _blocking_bus(client, entered, release)
    bus.start()

    def insert_then_signal() -> None:
        client.shop.orders.insert_one({"_id": "doc-1"})
        if entered.wait(10):
            os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=insert_then_signal, daemon=True)
    try:
        with caplog.at_level(logging.WARNING, logger="mongo_events.bus"):
            sender.start()
            # Given a callback that runs far longer than the stop may wait
            # When SIGTERM stops run_forever() with stop_timeout=0.2
            bus.run_forever(stop_timeout=0.2)
        assert entered.is_set(), "the callback never ran"
        # Then a WARNING names the bus, the callback, the wait and the redelivery
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and "still running" in r.getMessage()
        ]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
        (message,) = warnings
        assert message.startswith("bus stop-warn: 1 callback was still running")
        assert "'slow-one' on event" in message
        assert re.search(r"after \d+\.\ds \(the stop's timeout was 0\.2s\)", message), message
        assert "not checkpointed" in message and "delivered again" in message
        assert bus.state is me.BusState.STOPPED
    finally:
        release.set()
        sender.join(10)


def test_stop_raises_shutdown_timeout_with_the_wait_and_the_callbacks(
    client: pymongo.MongoClient[Any], caplog: pytest.LogCaptureFixture
) -> None:
    entered, release = threading.Event(), threading.Event()
    bus = _blocking_bus(client, entered, release)
    bus.start()
    try:
        client.shop.orders.insert_one({"_id": "doc-1"})
        assert entered.wait(10)
        with pytest.raises(me.ShutdownTimeout) as info:
            bus.stop(timeout=0.2)
        error = info.value
        assert len(error.running) == 1 and "'slow-one' on event" in error.running[0]
        assert error.waited is not None and f"after {error.waited:.1f}s" in str(error)
        assert "the stop's timeout was 0.2s" in str(error)
        # Raised, so not logged a second time
        assert not any("still running" in r.getMessage() for r in caplog.records)
    finally:
        release.set()
