"""``start()`` of a group member raises what makes the bus fail while it starts, at once.

It waits up to ``start_timeout`` for the streams of the partitions it took (like a single
stream bus waits for its one stream): a failure before or during that wait ends it, and
``start()`` raises the failure, as a single stream bus's ``start()`` does.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pymongo
import pytest

import mongo_events as me
from mongo_events.consumer import StreamConsumer
from mongo_events.watcher import Position

from .helpers import group_buses

START_TIMEOUT = 20.0


class WatchedEvent(threading.Event):
    """A ``connected`` event that says when someone (``start()``) waits on it."""

    def __init__(self, waiting: threading.Event) -> None:
        super().__init__()
        self.waiting = waiting

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def start_with_a_failing_partition(
    client: pymongo.MongoClient[Any], monkeypatch: pytest.MonkeyPatch, *, at_once: bool
) -> threading.Event:
    """Start a member of two partitions: the stream of partition 0 cannot open yet (it retries
    in the background), the stream of partition 1 fails ``at_once``, else once ``start()`` waits
    on the stream of partition 0. Asserts what ``start()`` does; returns the event set when
    ``start()`` waited on that stream."""
    waiting = threading.Event()
    fail_when = waiting
    if at_once:
        fail_when = threading.Event()
        fail_when.set()
    real_open, real_init = StreamConsumer._open_stream, StreamConsumer.__init__

    def init(self: StreamConsumer, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        if self.name == "member#0":
            self.connected = WatchedEvent(waiting)

    def open_stream(self: StreamConsumer, position: Position) -> Any:
        if self.name == "member#0":
            raise pymongo.errors.AutoReconnect("connection refused (test)")
        if self.name == "member#1":
            assert fail_when.wait(10.0)
            raise pymongo.errors.OperationFailure("not authorized (test)", code=13)
        return real_open(self, position)

    monkeypatch.setattr(StreamConsumer, "__init__", init)
    monkeypatch.setattr(StreamConsumer, "_open_stream", open_stream)
    with group_buses(client, group="g", partitions=2, lease_ttl=3.0, start_timeout=START_TIMEOUT) as make:
        bus = make("member")
        bus.subscribe(lambda event: None)
        started = time.monotonic()
        with pytest.raises(me.ConfigurationError) as info:
            bus.start()
        took = time.monotonic() - started
    # start() raised the failure, without waiting out start_timeout, and the bus failed
    assert info.value is bus.error
    assert "not authorized" in str(info.value)
    assert bus.state is me.BusState.FAILED
    assert took < START_TIMEOUT / 2, f"start() raised only after {took:.1f}s"
    return waiting


def test_start_raises_a_failure_as_the_member_takes_its_partitions(
    client: pymongo.MongoClient[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the stream of partition 1 failing at once, as the member takes the partitions
    # (usually before start() waits for the streams: the bus's stop may have ended them)
    start_with_a_failing_partition(client, monkeypatch, at_once=True)


def test_start_raises_a_failure_that_comes_while_it_waits_for_the_streams(
    client: pymongo.MongoClient[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the stream of partition 1 failing only once start() waits on partition 0's
    waiting = start_with_a_failing_partition(client, monkeypatch, at_once=False)
    assert waiting.is_set()  # the failure came while start() waited
