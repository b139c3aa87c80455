"""``join()`` on a group member waits only on the partitions it holds.

A partition revoked while ``join()`` waits on it (a rebalance, a lapsed or refused lease)
is halted with events queued that never start here: its next owner delivers them. The wait
on it ends when the partition is closed, instead of running on until the timeout, or for
ever without one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pymongo

import mongo_events as me
from mongo_events.groups.runtime import GroupRuntime

from ..conftest import wait_for
from .helpers import group_buses, held


@contextmanager
def _joining_a_busy_member(
    client: pymongo.MongoClient[Any],
) -> Iterator[tuple[me.Bus, GroupRuntime, threading.Event, list[bool | BaseException], threading.Event]]:
    """A member holding its one partition, its one worker busy with the first of two events
    and the second queued behind it, and a ``join()`` with no timeout waiting on it in a thread.

    Yields the bus, its group runtime, the event that lets the callback return, and the
    join's outcome with the event set when it ended.
    """
    release, entered = threading.Event(), threading.Event()

    def slow(event: me.ChangeEvent) -> None:
        entered.set()
        release.wait(30)

    with group_buses(client, group="g", partitions=1, lease_ttl=10.0, max_workers=1) as make:
        bus = make("member")
        bus.subscribe(slow, name="slow")
        outcome: list[bool | BaseException] = []
        done = threading.Event()

        def join() -> None:
            try:
                outcome.append(bus.join())
            except BaseException as exc:  # said in the test's assertion, not lost in the thread
                outcome.append(exc)
            finally:
                done.set()

        try:
            bus.start()
            assert wait_for(lambda: held(bus) == {0}, timeout=10.0)
            client.shop.orders.insert_many([{"_id": 1}, {"_id": 2}])
            assert entered.wait(10.0)
            assert wait_for(lambda: bus.pending_count() == 2, timeout=10.0)
            group = bus._run.group  # type: ignore[attr-defined]
            assert isinstance(group, GroupRuntime) and group.member is not None
            (part,) = group._parts.values()
            assert part.consumer is not None
            window = part.consumer.window
            threading.Thread(target=join, name="test-join", daemon=True).start()
            assert wait_for(lambda: window.joining == 1, timeout=10.0)
            yield bus, group, release, outcome, done
        finally:
            release.set()


def test_join_ends_when_a_partition_it_waits_on_is_revoked(client: pymongo.MongoClient[Any]) -> None:
    with _joining_a_busy_member(client) as (_bus, group, release, outcome, done):
        # When the partition is revoked (its queued event never starts here), then the
        # running callback returns
        assert group.member is not None
        group.member.drop(0, "test: revoked")
        release.set()
        # Then join() ends, and counts the revoked partition as done by this member
        assert done.wait(10.0), "join() still waits on a partition the member no longer holds"
        assert outcome == [True]


def test_join_says_false_when_the_member_stops_with_events_undone(client: pymongo.MongoClient[Any]) -> None:
    # A stop closes every partition too, but that is no rebalance: what was left undone
    # comes again at the next start, so join() must not say "every event done".
    with _joining_a_busy_member(client) as (bus, _group, _release, outcome, done):
        try:
            bus.stop(timeout=0.2)
        except me.ShutdownTimeout:
            pass  # the running callback was given up on: expected, not what this checks
        assert done.wait(10.0)
        assert outcome == [False]
