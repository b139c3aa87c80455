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
import time
from collections.abc import Callable, Iterator
from typing import Any

import pymongo
import pytest

import mongo_events as me
from mongo_events.dispatch import Dispatcher
from mongo_events.groups import partition_of, runtime
from mongo_events.groups.runtime import GroupRuntime
from mongo_events.lifecycle import FINAL_FLUSH_MIN

from ..conftest import wait_for
from ..helpers import FAST
from .helpers import group_buses, held


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
    with group_buses(client, group="g", partitions=1, lease_ttl=3.0) as make:

        def member(name: str, **options: Any) -> me.Bus:
            bus = make(name, **options)
            bus.subscribe(blocked, name="slow-one")
            return bus

        try:
            yield member
        finally:
            blocked.release.set()  # before the stops


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def one_in_each(partitions: int = 2) -> list[int]:
    """A document id of each partition, in partition order."""
    return [next(i for i in range(100) if partition_of(i, partitions) == p) for p in range(partitions)]


def busy_alone(
    members: Callable[..., me.Bus], client: pymongo.MongoClient[Any], blocked: Blocked, lease_ttl: float
) -> me.Bus:
    """A member "first" alone with both partitions, a callback running (blocked) in each."""
    first = members("first", partitions=2, lease_ttl=lease_ttl).start()
    assert wait_for(lambda: held(first) == {0, 1}, timeout=10.0)
    client.shop.orders.insert_many([{"_id": i} for i in one_in_each()])
    assert wait_for(lambda: blocked.count() == 2, timeout=10.0)
    return first


def _holding_one(members: Callable[..., me.Bus], **options: Any) -> me.Bus:
    """A member started alone, once it holds its one partition."""
    bus = members("member", **options).start()
    assert wait_for(lambda: held(bus) == {0}, timeout=10.0)
    return bus


def test_stop_states_the_lease_ttl_cap_it_applied_not_its_timeout(
    members: Callable[..., me.Bus], client: pymongo.MongoClient[Any], blocked: Blocked
) -> None:
    # Given a member (lease_ttl=3) holding the partition, with a callback running
    bus = _holding_one(members)
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
    ids = one_in_each()

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
    busy_alone(members, client, blocked, lease_ttl=1.5)
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
    members: Callable[..., me.Bus], client: pymongo.MongoClient[Any], caplog: pytest.LogCaptureFixture
) -> None:
    bus = members("member", partitions=4)
    assert bus.checkpoint_key_summary == "g:shop.orders#0..3"
    with caplog.at_level(logging.INFO, logger="mongo_events.bus"):
        bus.start()
    started = [r.getMessage() for r in caplog.records if " started: " in r.getMessage()]
    assert started == [
        "bus member started: watching shop.orders as a member of group g, checkpoint keys g:shop.orders#0..3"
    ]
    # and a bus without a group names its one key, as before
    plain = me.Bus(client.shop.orders, **FAST, name="plain")
    plain.subscribe(lambda event: None)
    with caplog.at_level(logging.INFO, logger="mongo_events.bus"):
        plain.start()
    try:
        assert [r.getMessage() for r in caplog.records if "plain started" in r.getMessage()] == [
            f"bus plain started: watching shop.orders, checkpoint key {plain.resume_token_key}"
        ]
    finally:
        plain.stop(timeout=5)


def test_a_bus_without_a_group_keeps_its_single_key(client: pymongo.MongoClient[Any]) -> None:
    bus = me.Bus(client.shop.orders, resume_token_id="host")
    assert bus.checkpoint_key_summary == bus.resume_token_key == "shop.orders:host"
    one = me.Bus(client.shop.orders, group="g")
    assert one.checkpoint_key_summary == "g:shop.orders#0"


def _runtime(bus: me.Bus) -> GroupRuntime:
    group = bus._run.group  # type: ignore[attr-defined]
    assert isinstance(group, GroupRuntime)
    return group


@pytest.fixture
def stuck_fence(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """``raise_fence`` (not bounded) blocks until ``gate`` is set, once ``entered`` is set."""
    gate, entered = threading.Event(), threading.Event()
    real = runtime.raise_fence

    def stuck(*args: Any) -> None:
        entered.set()
        gate.wait(30)
        real(*args)

    monkeypatch.setattr(runtime, "raise_fence", stuck)
    yield gate, entered
    gate.set()


def test_a_stop_whose_member_thread_does_not_end_still_names_the_running_callbacks(
    members: Callable[..., me.Bus],
    client: pymongo.MongoClient[Any],
    blocked: Blocked,
    stuck_fence: tuple[threading.Event, threading.Event],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate, entered = stuck_fence
    # Given a member holding one of two partitions, a callback running in it
    first = members("first", partitions=2, lease_ttl=3.0)
    second = members("second", partitions=2, lease_ttl=3.0)
    with caplog.at_level(logging.WARNING):
        gate.set()  # the first takes of both pass
        first.start()
        assert wait_for(lambda: held(first) == {0, 1}, timeout=10.0)
        second.start()
        assert wait_for(lambda: len(held(first)) == 1 and len(held(second)) == 1, timeout=15.0)
        (mine,) = held(first)
        client.shop.orders.insert_one({"_id": one_in_each()[mine]})
        assert wait_for(lambda: blocked.count() == 1, timeout=10.0)
        # and its thread stuck taking over the other partition (second stops and releases it)
        gate.clear()
        entered.clear()
        second.stop(timeout=5.0)
        assert entered.wait(15.0)
        # When it stops: its member's thread does not end in time
        with pytest.raises(me.ShutdownTimeout) as info:
            first.stop(timeout=5.0)
    # Then the callback is still named, and the skipped final checkpoint is said
    assert len(info.value.running) == 1 and "'slow-one' on event" in info.value.running[0]
    (message,) = _warnings(caplog, "thread did not end")
    assert f"final checkpoints of partitions [{mine}] were not written" in message
    assert "no lease was released" in message


def test_a_rebalance_under_way_when_the_stop_begins_says_its_callbacks_itself(
    members: Callable[..., me.Bus],
    client: pymongo.MongoClient[Any],
    blocked: Blocked,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a member alone with both partitions, a callback running in each (lease_ttl 30: a
    # revocation at a rebalance waits 2.5 s for callbacks)
    first = busy_alone(members, client, blocked, lease_ttl=30.0)
    group = _runtime(first)
    with caplog.at_level(logging.WARNING, logger="mongo_events.groups.runtime"):
        # When a second member joins, and the stop begins while the first is releasing one to it
        members("second", partitions=2, lease_ttl=30.0).start()
        # not held(): the member's lock is held while it revokes
        assert wait_for(lambda: len(group._parts) == 1, timeout=15.0)
        with pytest.raises(me.ShutdownTimeout) as info:
            first.stop(timeout=4.0)
    # Then the rebalance says its callback (the stop no longer silences it), the stop the other
    (message,) = _warnings(caplog, "given up (a rebalance moved it to another member)")
    assert "1 callback(s) still ran" in message and "lease_ttl / 6 = 5.00s" in message
    assert len(info.value.running) == 1


def test_a_partition_taken_as_the_stop_begins_is_not_started(
    members: Callable[..., me.Bus],
    client: pymongo.MongoClient[Any],
    blocked: Blocked,
    stuck_fence: tuple[threading.Event, threading.Event],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate, entered = stuck_fence
    # Given a standby whose thread is taking over the partition (the holder stopped) when its
    # stop begins, and an event waiting in that partition
    gate.set()
    holder = members("holder", lease_ttl=6.0).start()
    assert wait_for(lambda: held(holder) == {0}, timeout=10.0)
    standby = members("standby", lease_ttl=6.0).start()
    gate.clear()
    entered.clear()
    holder.stop(timeout=5.0)
    assert entered.wait(15.0)
    client.shop.orders.insert_one({"_id": 1})
    outcome: list[BaseException | None] = []

    def stop() -> None:
        try:
            standby.stop(timeout=5.0)
            outcome.append(None)
        except me.ShutdownTimeout as exc:
            outcome.append(exc)

    stopper = threading.Thread(target=stop, daemon=True)
    with caplog.at_level(logging.INFO, logger="mongo_events.groups.runtime"):
        stopper.start()
        assert wait_for(lambda: _runtime(standby)._stopping, timeout=10.0)
        # When the take-over goes on after the stop took its snapshot of the partitions
        gate.set()
        stopper.join(30.0)
    assert not stopper.is_alive()
    # Then every callback that ran is named by the stop: here the partition never started
    reported = outcome[0].running if isinstance(outcome[0], me.ShutdownTimeout) else ()
    assert blocked.count() == len(reported) == 0
    assert any("was taken as the bus stops: not started" in r.getMessage() for r in caplog.records)


def test_the_whole_group_stop_is_bounded_by_lease_ttl_over_3_plus_the_final_write(
    members: Callable[..., me.Bus], monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = _holding_one(members, lease_ttl=3.0)
    member = _runtime(bus).member
    assert member is not None
    real, seen = member.stop, []

    def spy(timeout: float = 5.0, deadline: float | None = None) -> bool:
        seen.append((timeout, deadline))
        return real(timeout, deadline)

    monkeypatch.setattr(member, "stop", spy)
    started = time.monotonic()
    bus.stop(timeout=30.0)
    # The member's join and its releases end by lease_ttl / 3 + FINAL_FLUSH_MIN, not the 30 s
    ((timeout, deadline),) = seen
    assert timeout <= 1.0 + FINAL_FLUSH_MIN
    assert deadline is not None and deadline - started <= 1.0 + FINAL_FLUSH_MIN


def test_a_final_checkpoint_skipped_for_lack_of_time_is_said(
    members: Callable[..., me.Bus], caplog: pytest.LogCaptureFixture
) -> None:
    bus = _holding_one(members, lease_ttl=3.0)
    (part,) = _runtime(bus)._parts.values()
    assert part.flushing.acquire(timeout=10.0)  # a flush that does not end in time
    try:
        with caplog.at_level(logging.WARNING, logger="mongo_events.groups.runtime"):
            bus.stop(timeout=5.0)
    finally:
        part.flushing.release()
    (message,) = _warnings(caplog, "final checkpoint of partition 0 not written")
    assert "redelivers the events after the last stored checkpoint" in message


def test_hurry_ends_a_group_stops_wait_for_callbacks(
    members: Callable[..., me.Bus],
    client: pymongo.MongoClient[Any],
    blocked: Blocked,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[threading.Event | None] = []
    real = Dispatcher.wait_idle

    def spy(self: Dispatcher, deadline: float, hurry: threading.Event | None = None) -> bool:
        waits.append(hurry)
        return real(self, deadline, hurry)

    monkeypatch.setattr(Dispatcher, "wait_idle", spy)
    # Given a member (lease_ttl 30: its stop would wait 5 s for callbacks) with a callback running
    bus = _holding_one(members, lease_ttl=30.0)
    client.shop.orders.insert_one({"_id": 1})
    assert wait_for(lambda: blocked.count() == 1, timeout=10.0)
    # When the stop is hurried
    bus.hurry()
    with pytest.raises(me.ShutdownTimeout) as info:
        bus.stop(timeout=30.0)
    # Then the partition's wait for callbacks was given the run's hurry, and the error says so
    assert waits and all(h is not None and h.is_set() for h in waits)
    assert "the stop was hurried" in str(info.value)


def test_a_stop_shorter_than_the_cap_states_the_half_it_waited(
    members: Callable[..., me.Bus], client: pymongo.MongoClient[Any], blocked: Blocked
) -> None:
    bus = _holding_one(members, lease_ttl=30.0)  # cap lease_ttl / 3 = 10 s > timeout
    client.shop.orders.insert_one({"_id": 1})
    assert wait_for(lambda: blocked.count() == 1, timeout=10.0)
    with pytest.raises(me.ShutdownTimeout) as info:
        bus.stop(timeout=2.0)
    message = str(info.value)
    assert "waits for callbacks half of the stop's timeout of 2.0s" in message
    assert "the stop's timeout was" not in message


def test_a_partition_dropped_during_a_rebalance_is_said_with_its_real_cause(
    members: Callable[..., me.Bus],
    client: pymongo.MongoClient[Any],
    blocked: Blocked,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = _holding_one(members, lease_ttl=3.0)
    client.shop.orders.insert_one({"_id": 1})
    assert wait_for(lambda: blocked.count() == 1, timeout=10.0)
    group = _runtime(bus)
    assert group.member is not None
    group._release_deadline = time.monotonic() + 0.5  # as if a rebalance were releasing partitions
    with caplog.at_level(logging.WARNING, logger="mongo_events.groups.runtime"):
        group.member.drop(0, "a fenced write was refused")
    (message,) = _warnings(caplog, "still ran")
    assert "given up (a fenced write was refused)" in message and "rebalance moved it" not in message
