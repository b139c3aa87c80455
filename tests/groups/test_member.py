"""GroupMember driven tick by tick on a fake clock (deterministic), then its thread."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pymongo
import pytest
from pymongo import _csot

from mongo_events import StoreError
from mongo_events.groups import (
    FencedOut,
    FencedResumeTokenStore,
    GroupConfig,
    GroupMember,
    GroupMismatch,
    Lease,
    MemoryFencedResumeTokenStore,
    MemoryLeaseStore,
    MongoLeaseStore,
    Owner,
    PartitionMode,
)
from mongo_events.groups.member import SWEEP_AFTER
from mongo_events.testing import FakeReplicaSet

from ..conftest import CLIENT_OPTIONS

TTL = 9.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """A member's callbacks, recorded as ("assigned", p, fence) / ("revoked", p)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def assigned(self, p: int, fence: int) -> None:
        self.calls.append(("assigned", p, fence))

    def revoked(self, p: int) -> None:
        self.calls.append(("revoked", p))


def member(
    store: MemoryLeaseStore, clock: Clock, name: str, partitions: int = 4, **kw: Any
) -> tuple[GroupMember, Recorder]:
    rec = Recorder()
    m = GroupMember(
        store,
        "g",
        "db.c",
        partitions=partitions,
        ttl=TTL,
        owner=Owner("h", 1, name),
        clock=clock,
        on_assigned=rec.assigned,
        on_revoked=rec.revoked,
        **kw,
    )
    return m, rec


def test_join_rebalance_and_leave() -> None:
    clock, store = Clock(), MemoryLeaseStore(Clock())
    store._clock = clock  # one clock for the store and the members
    a, ra = member(store, clock, "a")
    a.tick()
    assert a.owned == {0: 1, 1: 1, 2: 1, 3: 1}
    b, rb = member(store, clock, "b")
    b.tick()  # b's share is 2 partitions still held by a
    assert b.owned == {}
    a.tick()  # a sees b and releases the surplus (revoking first)
    assert len(a.owned) == 2 and [c for c in ra.calls if c[0] == "revoked"] == [
        ("revoked", 2),
        ("revoked", 3),
    ]
    b.tick()
    assert b.owned == {2: 2, 3: 2}  # taken from a: the fence grew
    assert a.rebalances == 2 and b.rebalances == 1
    b.stop()  # a clean stop releases at once
    assert rb.calls[-2:] == [("revoked", 2), ("revoked", 3)] and store.live("g:db.c/members/b") == {}
    a.tick()
    assert a.owned == {0: 1, 1: 1, 2: 3, 3: 3}


def test_a_dead_member_s_partitions_are_taken_after_its_lease_expires() -> None:
    clock = Clock()
    store = MemoryLeaseStore(clock)
    a, _ = member(store, clock, "a", partitions=2)
    b, _ = member(store, clock, "b", partitions=2)
    a.tick(), b.tick(), a.tick(), b.tick()
    assert len(a.owned) == len(b.owned) == 1
    assert a.owned == {0: 1} and b.owned == {1: 2}  # a took both first, then gave 1 to b
    while len(a.owned) < 2:  # b is gone (SIGKILL): it never ticks again
        clock.now += TTL / 12
        a.tick()
        assert clock.now <= TTL + TTL / 12, "not taken over within the ttl plus one poll"
    assert clock.now >= TTL and a.owned == {0: 1, 1: 3} and a.members == ("a",)


def test_a_release_is_logged_like_a_take(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mongo_events.groups")
    clock = Clock()
    store = MemoryLeaseStore(clock)
    a, _ = member(store, clock, "a", partitions=2)
    a.tick()
    b, _ = member(store, clock, "b", partitions=2)
    b.tick(), a.tick()  # a releases partition 1 to b
    a.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "released" in m] == [
        "group g on db.c: h/1/a released partition 1 (fence 1)",
        "group g on db.c: h/1/a released partition 0 (fence 1)",
    ]


def test_heartbeats_of_members_gone_long_ago_are_deleted() -> None:
    # Every process start leaves a heartbeat lease; without a sweep they pile up forever
    # (and every poll's read of the members goes over all of them).
    clock = Clock()
    store = MemoryLeaseStore(clock)
    a, _ = member(store, clock, "a", partitions=2)
    killed, _ = member(store, clock, "killed", partitions=2)
    stopped, _ = member(store, clock, "stopped", partitions=2)
    a.tick(), killed.tick(), stopped.tick()
    stopped.stop()  # releases its heartbeat; "killed" never ticks again
    heartbeats = "g:db.c/members/"
    assert {k for k in store._leases if k.startswith(heartbeats)} == {
        heartbeats + "a",
        heartbeats + "killed",
        heartbeats + "stopped",
    }
    while clock.now < (2 * SWEEP_AFTER + 1) * TTL:
        clock.now += TTL / 12
        a.tick()
    assert {k for k in store._leases if k.startswith(heartbeats)} == {heartbeats + "a"}
    assert set(a.owned) == {0, 1} and {a.key(0), a.key(1)} <= set(store._leases)  # partitions kept


def test_active_standby_with_one_partition() -> None:
    clock = Clock()
    store = MemoryLeaseStore(clock)
    a, _ = member(store, clock, "z", partitions=1)
    b, rb = member(store, clock, "a", partitions=1)
    a.tick(), b.tick(), a.tick(), b.tick()
    assert a.owned == {0: 1} and b.owned == {}  # sticky: the lower id waits
    a.stop()
    b.tick()
    assert b.owned == {0: 2} and rb.calls == [("assigned", 0, 2)]


def test_renews_at_a_third_of_the_ttl_without_a_write_per_tick() -> None:
    clock = Clock()
    store = MemoryLeaseStore(clock)
    a, ra = member(store, clock, "a", partitions=2)
    a.tick()
    writes = store.writes
    for _ in range(5):
        clock.now += TTL / 12
        a.tick()
    # in 5/12 of a ttl: one renewal of each partition and of the heartbeat, nothing else
    assert store.writes - writes == 3
    assert a.owned == {0: 1, 1: 1} and ra.calls == [("assigned", 0, 1), ("assigned", 1, 1)]


class FailingRenewals(MemoryLeaseStore):
    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.down = False

    def renew(self, lease: Lease, ttl: float) -> bool:
        if self.down:
            raise StoreError("the store is unreachable")
        return super().renew(lease, ttl)

    def acquire(self, key: str, owner: Owner, ttl: float) -> Lease | None:
        if self.down:
            raise StoreError("the store is unreachable")
        return super().acquire(key, owner, ttl)


def test_a_member_that_cannot_renew_gives_up_before_its_lease_can_expire() -> None:
    clock = Clock()
    store = FailingRenewals(clock)
    a, ra = member(store, clock, "a", partitions=1)
    a.tick()
    store.down = True
    while not [c for c in ra.calls if c[0] == "revoked"]:
        clock.now += TTL / 12
        a.tick()
        assert clock.now < TTL, "the member kept a partition it could not renew"
    assert clock.now >= TTL * 2 / 3 and not a.holds(0)
    # revoked while the lease still stood on the store: nobody else could have owned it yet
    assert store.live("g:db.c#") != {}


def test_a_paused_member_is_fenced_out_when_it_wakes_up() -> None:
    clock = Clock()
    store = MemoryLeaseStore(clock)
    tokens = MemoryFencedResumeTokenStore()
    a, ra = member(store, clock, "a", partitions=1)
    a.tick()
    old = FencedResumeTokenStore(tokens, a.owned[0])
    old.save(a.key(0), {"_data": "a-1"})
    clock.now += TTL * 1.5  # a is paused (SIGSTOP, GC, VM freeze): no tick
    assert not a.holds(0)  # what a checks before delivering, without I/O
    b, _ = member(store, clock, "b", partitions=1)
    b.tick()
    assert b.owned == {0: 2}
    FencedResumeTokenStore(tokens, 2).save(b.key(0), {"_data": "b-1"})
    with pytest.raises(FencedOut, match="stored fence is 2"):
        old.save(a.key(0), {"_data": "a-2"})
    a.tick()  # a wakes up: its lease is overdue, it stops the partition
    assert ("revoked", 0) in ra.calls and a.owned == {}
    loaded = tokens.load(a.key(0))
    assert loaded is not None and loaded.token == {"_data": "b-1"}


def test_a_member_with_another_partition_count_is_refused() -> None:
    clock = Clock()
    store = MemoryLeaseStore(clock)
    member(store, clock, "a", partitions=4)[0].tick()
    with pytest.raises(GroupMismatch):
        member(store, clock, "b", partitions=8)[0].start()
    with pytest.raises(GroupMismatch):
        member(store, clock, "c", partitions=4, mode=PartitionMode.CLIENT)[0].tick()


class SlowJoins(MemoryLeaseStore):
    """A store whose first ``joins`` joins fail, as a cold client's first call does when it
    outlasts ``ttl / 6`` on a loaded host."""

    def __init__(self, clock: Clock, joins: int) -> None:
        super().__init__(clock)
        self.failing_joins = joins

    def join_group(self, config: GroupConfig) -> GroupConfig:
        if self.failing_joins > 0:
            self.failing_joins -= 1
            raise StoreError("could not join group 'g': timed out (timeoutMS: 1500ms)")
        return super().join_group(config)


def test_a_member_whose_join_fails_keeps_trying_and_takes_its_share() -> None:
    clock = Clock()
    store = SlowJoins(clock, joins=2)
    a, ra = member(store, clock, "a", partitions=2)
    a.tick()  # the join fails: not fatal (it was, and the process died owning nothing)
    assert a.owned == {} and ra.calls == [] and store.live("g") == {}
    clock.now += TTL / 12
    a.tick()
    assert a.owned == {} and store.live("g") == {}  # nothing taken before it joined
    clock.now += TTL / 12
    a.tick()
    assert a.owned == {0: 1, 1: 1} and ra.calls == [("assigned", 0, 1), ("assigned", 1, 1)]


def test_a_mismatch_found_after_a_failed_join_is_fatal() -> None:
    clock = Clock()
    store = SlowJoins(clock, joins=1)
    member(store, clock, "a", partitions=4)[0].tick()  # fails, then:
    member(store, clock, "b", partitions=4)[0].tick()  # joins with 4
    late, _ = member(store, clock, "c", partitions=8)
    store.failing_joins = 1
    late.tick()  # no answer yet: nothing raised
    with pytest.raises(GroupMismatch):
        late.tick()


def test_start_survives_a_first_call_slower_than_its_bound_against_the_fake_server() -> None:
    """The real path: pymongo.timeout(ttl / 6) around a cold client's first command."""
    ttl = 0.6
    assigned = threading.Event()
    with FakeReplicaSet() as rs:
        rs.delay("ping", ttl)  # join_group's first command, far past ttl / 6
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        m = GroupMember(
            MongoLeaseStore(client.db["_event_leases"]),
            "g",
            "db.c",
            ttl=ttl,
            on_assigned=lambda p, fence: assigned.set(),
        )
        try:
            m.start()  # raised StoreError ("timed out") before: the process died here
            assert assigned.wait(20 * ttl), "the member never joined after its first join timed out"
            assert m.owned == {0: 1} and m.error is None
        finally:
            assert m.stop(5)
            client.close()


@pytest.mark.parametrize("bad", [{"group": ""}, {"group": "a:b"}, {"partitions": 0}, {"ttl": 0}])
def test_bad_settings_are_refused(bad: dict[str, Any]) -> None:
    settings: dict[str, Any] = {"group": "g", "partitions": 1, "ttl": 1.0, **bad}
    with pytest.raises(ValueError):
        GroupMember(MemoryLeaseStore(), settings.pop("group"), "db.c", **settings)


def test_the_thread_assigns_and_a_failing_callback_fails_the_member_loudly() -> None:
    store = MemoryLeaseStore()
    assigned = threading.Event()
    failed: list[BaseException] = []
    done = threading.Event()

    def on_assigned(p: int, fence: int) -> None:
        assigned.set()
        if p == 1:
            raise RuntimeError("cannot start partition 1")

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        done.set()

    late = GroupMember(store, "g", "db.c", partitions=2, ttl=0.6, on_assigned=on_assigned, on_fatal=on_fatal)
    first = GroupMember(store, "g", "db.c", partitions=1 + 1, ttl=0.6)
    first.start()  # holds both
    assert first.owned.keys() == {0, 1}
    late.start()
    assert first.stop(5)  # hands both over; late takes them on its thread, and partition 1's callback raises
    assert done.wait(10) and assigned.is_set()
    assert "cannot start partition 1" in repr(failed[0].__cause__) and late.error is failed[0]
    assert late.owned == {} and store.live("g") == {}  # it released what it held


class SlowRenewals(MemoryLeaseStore):
    """A renewal that succeeds, but only after a whole ttl (a stalled network, a slow primary)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.clock = clock

    def renew(self, lease: Lease, ttl: float) -> bool:
        self.clock.now += TTL
        return super().renew(lease, ttl)


def test_a_renewal_that_succeeds_too_late_does_not_keep_the_partition() -> None:
    clock = Clock()
    store = SlowRenewals(clock)
    a, ra = member(store, clock, "a", partitions=1)
    a.tick()
    clock.now += TTL / 3
    a.tick()  # the renewal is measured from when it was sent: a whole ttl ago when it returns
    assert ("revoked", 0) in ra.calls and not a.holds(0)


def test_a_rebalance_announces_every_partition_it_releases_before_revoking_them() -> None:
    clock, store = Clock(), MemoryLeaseStore(Clock())
    store._clock = clock
    calls: list[tuple[Any, ...]] = []
    a, _ = member(store, clock, "a", on_releasing=lambda ps: calls.append(("releasing", ps)))
    a.on_revoked = lambda p: calls.append(("revoked", p))
    a.tick()
    b, _ = member(store, clock, "b")
    b.tick()
    a.tick()  # a releases its surplus to b
    assert calls == [("releasing", (2, 3)), ("revoked", 2), ("revoked", 3)]


class SlowReleases(MemoryLeaseStore):
    """A release that takes ttl / 6 (a slow store), recording the bound each call was given."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.clock = clock
        self.bounds: list[tuple[str, float | None]] = []

    def release(self, lease: Lease) -> None:
        self.bounds.append((lease.key, _csot.get_timeout()))
        self.clock.now += TTL / 6
        super().release(lease)


def test_a_stop_bounds_its_releases_by_its_deadline(caplog: pytest.LogCaptureFixture) -> None:
    # Given a member holding 4 partitions on a store whose releases take ttl / 6 each
    clock = Clock()
    store = SlowReleases(clock)
    a, _ = member(store, clock, "a")
    a.tick()
    assert set(a.owned) == {0, 1, 2, 3}
    # When it stops with TTL / 4 left
    with caplog.at_level(logging.WARNING, logger="mongo_events.groups"):
        assert a.stop(5, deadline=TTL / 4)
    # Then each release call is bounded by the time left, and none starts after the deadline:
    # two fit (ttl / 6, then what was left), the rest expire by themselves, as a WARNING says
    assert [key for key, _ in store.bounds] == [a.key(0), a.key(1)]
    assert [bound for _, bound in store.bounds] == pytest.approx([TTL / 6, TTL / 4 - TTL / 6])
    assert clock.now == pytest.approx(2 * TTL / 6)
    (message,) = [r.getMessage() for r in caplog.records if "did not release" in r.getMessage()]
    assert "partition 2, partition 3, the heartbeat" in message and "expire by themselves" in message
    assert set(store.live("g:db.c#")) == {a.key(2), a.key(3)}


def test_a_stop_revokes_every_partition_before_it_releases_any() -> None:
    # A release call (up to ttl / 6) must not eat the time of a later partition's final checkpoint
    clock = Clock()
    calls: list[tuple[Any, ...]] = []

    class Recording(MemoryLeaseStore):
        def release(self, lease: Lease) -> None:
            calls.append(("release", lease.key))
            super().release(lease)

    store = Recording(clock)
    a, _ = member(store, clock, "a", partitions=2)
    a.on_revoked = lambda p: calls.append(("revoked", p))
    a.tick()
    assert a.stop(5)
    assert calls == [
        ("revoked", 0),
        ("revoked", 1),
        ("release", a.key(0)),
        ("release", a.key(1)),
        ("release", "g:db.c/members/a"),
    ]


def test_on_revoked_why_is_told_the_real_cause() -> None:
    clock, store = Clock(), MemoryLeaseStore(Clock())
    store._clock = clock
    why: list[tuple[int, str]] = []
    a, ra = member(store, clock, "a", on_revoked_why=lambda p, w: why.append((p, w)))
    a.tick()
    a.drop(0, "a fenced write was refused")
    b, _ = member(store, clock, "b")
    b.tick()
    a.tick()  # a (1, 2, 3) releases its surplus to b
    kept = set(a.owned)
    a.stop()
    assert why[0] == (0, "a fenced write was refused")
    rebalanced, stopping = "a rebalance moved it to another member", "the member is stopping"
    assert why[1:] == [(p, rebalanced) for p in sorted({1, 2, 3} - kept)] + [
        (p, stopping) for p in sorted(kept)
    ]
    assert len(kept) == 2
    assert ra.calls == [c for c in ra.calls if c[0] == "assigned"]  # called instead of on_revoked
