"""Consumers publish their status (the numbers of ``Bus.health()``) for dashboards in other processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pymongo
import pytest

import mongo_events as me
from mongo_events.errors import StoreError
from mongo_events.monitor import (
    ConsumerStatus,
    ConsumerStatusStore,
    MemoryConsumerStatusStore,
    MongoConsumerStatusStore,
    StatusPublisher,
    group_views,
)

from .conftest import wait_for
from .helpers import QUICK, Recorder, make_member, make_status


def test_a_running_bus_publishes_the_numbers_of_its_health(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    store = MongoConsumerStatusStore(client.internal)
    letters = me.MemoryDeadLetterStore()
    bus = make_bus(
        client.shop.orders, name="orders", status=StatusPublisher(store, interval=0.05), dead_letters=letters
    )
    seen = Recorder()

    @bus.subscribe(max_retries=1, retry_backoff=QUICK)
    def handle(ev: me.ChangeEvent) -> None:
        if ev.document_id == 2:
            raise ValueError("<b>bad</b> order")
        seen.add(ev.document_id)

    bus.start()
    client.shop.orders.insert_many([{"_id": 1}, {"_id": 2}, {"_id": 3}])
    seen.wait(2)
    assert wait_for(lambda: letters.count() == 1)
    # Then the next heartbeat carries the counts: 2 processed, 2 failed attempts, 1 dead letter.
    found = wait_for(lambda: [s for s in store.list() if s.processed == 2 and s.dead_lettered == 1], 10)
    assert found, store.list()  # (an unpacking of [] would only say "not enough values")
    (status,) = found
    assert status.bus == "orders" and status.state == "running" and status.status in ("healthy", "degraded")
    assert status.failed == 2 and status.group is None and list(status.partitions) == []
    assert status.checkpoint_key == bus.resume_token_key and status.namespace == "shop.orders"
    assert status.pid > 0 and status.host and status.interval == 0.05
    assert status.checkpoint_time is not None and status.checkpoint_age is not None
    assert sum(h[1] for h in status.history) == 2 and sum(h[2] for h in status.history) == 2
    assert status.to_json()["processed_per_minute"] >= 1
    health = bus.health()
    assert status.in_flight <= max(health.in_flight, 3) and status.reconnections == health.reconnections
    # The TTL index makes dead processes fade out.
    ttl = [i for i in client.internal["_event_consumers"].list_indexes() if "expireAfterSeconds" in i]
    assert ttl and dict(ttl[0]["key"]) == {"heartbeat_at": 1} and ttl[0]["expireAfterSeconds"] == 120

    bus.stop(timeout=5)
    (final,) = store.list("orders")
    assert final.state == "stopped" and final.status == "unhealthy"


def test_a_stopped_bus_writes_its_final_status_even_with_a_long_interval(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    store = MemoryConsumerStatusStore()
    bus = make_bus(client.shop.orders, status=StatusPublisher(store, interval=3600))
    bus.subscribe(lambda ev: None)
    bus.start()
    assert wait_for(lambda: store.list())  # the first write comes at once
    bus.stop(timeout=5)
    (final,) = store.list()
    assert final.state == "stopped"
    assert bus.status is not None and bus.status.failures == 0


class _Recording(MemoryConsumerStatusStore):
    def __init__(self) -> None:
        super().__init__()
        self.states: list[str] = []

    def publish(self, status: ConsumerStatus) -> None:
        self.states.append(status.state)
        super().publish(status)


def test_a_started_bus_publishes_again_once_it_runs(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    store = _Recording()
    bus = make_bus(client.shop.orders, status=StatusPublisher(store, interval=3600))
    bus.subscribe(lambda ev: None)
    bus.start()
    # The first status is written while the bus starts (and says unhealthy); a rolling
    # restart should not wait a whole interval for the one that says it runs.
    assert wait_for(lambda: "running" in store.states), store.states
    assert store.states[0] in ("starting", "running")
    (status,) = store.list()
    assert status.state == "running" and status.status in ("healthy", "degraded")
    bus.stop(timeout=5)
    assert store.states[-1] == "stopped"


class _LateFirstWrite(_Recording):
    """Holds the first write until the bus runs: its snapshot said "starting", and the
    publisher looks at the state only afterwards (the interleaving CI met)."""

    def __init__(self) -> None:
        super().__init__()
        self.bus: Any = None

    def publish(self, status: ConsumerStatus) -> None:
        if not self.states:
            assert wait_for(lambda: self.bus is not None and self.bus.state.value == "running")
        super().publish(status)


class _Snapping(StatusPublisher):
    """Sets ``snapped`` once it took its first snapshot."""

    def __init__(self, store: ConsumerStatusStore, interval: float) -> None:
        super().__init__(store, interval)
        self.snapped = threading.Event()

    def snapshot(self) -> ConsumerStatus:
        status = super().snapshot()
        self.snapped.set()
        return status


def test_a_bus_that_runs_while_its_first_status_is_written_publishes_again(
    client: pymongo.MongoClient[Any], make_bus: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mongo_events import run as run_module

    store = _LateFirstWrite()
    publisher = _Snapping(store, interval=3600)
    bus = make_bus(client.shop.orders, status=publisher)
    store.bus = bus
    # The bus stays STARTING until the first snapshot was taken (so it says "starting")
    original = run_module.wait_for_stream

    def after_the_first_snapshot(*args: Any) -> None:
        assert publisher.snapped.wait(15)
        original(*args)

    monkeypatch.setattr(run_module, "wait_for_stream", after_the_first_snapshot)
    bus.subscribe(lambda ev: None)
    bus.start()
    assert wait_for(lambda: "running" in store.states), store.states
    assert store.states[0] == "starting"
    bus.stop(timeout=5)
    assert store.states[-1] == "stopped"


class _Broken(ConsumerStatusStore):
    def __init__(self) -> None:
        super().__init__()
        self.tried = threading.Event()

    def publish(self, status: ConsumerStatus) -> None:
        self.tried.set()
        raise StoreError("status collection is down")

    def list(self, bus: str | None = None) -> list[ConsumerStatus]:
        return []


def test_a_status_outage_never_touches_events(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    store = _Broken()
    bus = make_bus(client.shop.orders, status=store)
    seen = Recorder()
    bus.subscribe(lambda ev: seen.add(ev.document_id))
    bus.start()
    assert store.tried.wait(5)
    client.shop.orders.insert_one({"_id": 1})
    assert seen.wait(1) == [1]
    assert bus.state is me.BusState.RUNNING and bus.status is not None and bus.status.failures >= 1
    bus.stop(timeout=5)
    assert bus.state is me.BusState.STOPPED


class _Exiting(_Broken):
    def publish(self, status: ConsumerStatus) -> None:
        self.tried.set()
        raise SystemExit("a store that exits")  # not an Exception: publish() does not keep it


def test_a_status_thread_that_dies_says_so_and_the_bus_delivers(
    client: pymongo.MongoClient[Any], make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = _Exiting()
    bus = make_bus(client.shop.orders, status=store)
    seen = Recorder()
    bus.subscribe(lambda ev: seen.add(ev.document_id))
    bus.start()
    assert store.tried.wait(5)
    assert wait_for(lambda: "status publisher thread died" in caplog.text)
    assert any(r.levelname == "ERROR" and "SystemExit" in r.getMessage() for r in caplog.records)
    client.shop.orders.insert_one({"_id": 1})
    assert seen.wait(1) == [1]
    assert bus.state is me.BusState.RUNNING and bus.status is not None and bus.status.failures >= 1
    bus.stop(timeout=5)
    assert bus.state is me.BusState.STOPPED


def test_stale_and_expired_statuses() -> None:
    store = MemoryConsumerStatusStore(ttl=60)
    now = datetime.now(timezone.utc)
    store.publish(make_status(id="a", heartbeat_at=now))
    store.publish(make_status(id="b", heartbeat_at=now - timedelta(seconds=30)))  # 3 intervals missed
    store.publish(make_status(id="c", heartbeat_at=now - timedelta(seconds=61)))  # past the TTL: gone
    store.publish(make_status(id="d", bus="other", heartbeat_at=now))
    assert [s.id for s in store.list("orders")] == ["a", "b"]
    fresh, stale = store.list("orders")
    assert not fresh.is_stale() and fresh.effective_status() == "healthy"
    assert stale.is_stale() and stale.effective_status() == "unhealthy" and stale.to_json()["stale"] is True
    assert len(store.list()) == 3


def test_mongo_store_round_trips_a_status(client: pymongo.MongoClient[Any]) -> None:
    store = MongoConsumerStatusStore(client.internal, ttl=30)
    store.ensure_indexes()
    status = make_status(
        history=((60, 1, 2),),
        partitions=(),
        last_error="E: x",
        last_error_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
    )
    store.publish(status)
    (back,) = store.list()
    # BSON dates keep milliseconds
    assert back == attrs_evolve_ms(status)


def attrs_evolve_ms(status: ConsumerStatus) -> ConsumerStatus:
    import attrs

    hb = status.heartbeat_at
    return attrs.evolve(status, heartbeat_at=hb.replace(microsecond=hb.microsecond // 1000 * 1000))


def test_bad_options_are_refused() -> None:
    with pytest.raises(me.ConfigurationError):
        MemoryConsumerStatusStore(ttl=0)
    with pytest.raises(me.ConfigurationError):
        StatusPublisher(MemoryConsumerStatusStore(), interval=0)


class _Hanging(ConsumerStatusStore):
    """A status store whose writes block until released (a server that stopped answering)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def publish(self, status: ConsumerStatus) -> None:
        self.entered.set()
        self.release.wait(600)  # longer than the test timeout: an unbounded stop fails the test

    def list(self, bus: str | None = None) -> list[ConsumerStatus]:
        return []


@pytest.fixture
def stuck_publisher(client: pymongo.MongoClient[Any], make_bus: Any) -> Iterator[me.Bus]:
    """A running bus whose status publisher is stuck inside a write (released at teardown)."""
    store = _Hanging()
    bus = make_bus(client.shop.orders, status=store)
    bus.subscribe(lambda ev: None)
    bus.start()
    try:
        assert store.entered.wait(5)
        yield bus
    finally:
        store.release.set()


def test_a_hanging_status_store_does_not_hold_up_stop(stuck_publisher: me.Bus) -> None:
    # The publisher thread is stuck in a write; stop waits for it no longer than its timeout.
    stuck_publisher.stop(timeout=0.5)
    assert stuck_publisher.state is me.BusState.STOPPED


def test_a_hurried_stop_does_not_wait_for_a_hanging_status_store(stuck_publisher: me.Bus) -> None:
    from mongo_events.lifecycle import FINAL_FLUSH_MIN

    stuck_publisher.hurry()  # a second signal: the stop's waits shrink to FINAL_FLUSH_MIN, the status write's too
    started = time.monotonic()
    stuck_publisher.stop(timeout=600)
    took = time.monotonic() - started
    assert stuck_publisher.state is me.BusState.STOPPED
    assert took < 600 / 2, f"a hurried stop waited {took:.1f}s for the status store"
    assert took <= FINAL_FLUSH_MIN * 3 + 5  # the final flush and the status write, each bounded


def test_one_publisher_serves_one_bus(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    store = MemoryConsumerStatusStore()
    publisher = StatusPublisher(store, interval=3600)
    first = make_bus(client.shop.orders, name="first", status=publisher)
    first.subscribe(lambda ev: None)
    second = make_bus(client.shop.invoices, name="second", status=publisher)
    second.subscribe(lambda ev: None)
    first.start()
    assert wait_for(lambda: [s.bus for s in store.list()] == ["first"])
    with pytest.raises(me.ConfigurationError, match="already publishes bus 'first'"):
        second.start()
    first.stop(timeout=5)
    # The first bus's heartbeats were never taken over: its final status says stopped.
    assert [(s.bus, s.state) for s in store.list()] == [("first", "stopped")]


def test_a_group_member_publishes_the_group_partition_count(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    store = MemoryConsumerStatusStore()
    bus = make_bus(
        client.shop.orders,
        name="counted",
        group="billing",
        partitions=4,
        lease_ttl=1.5,
        status=StatusPublisher(store, interval=0.05),
    )
    bus.subscribe(lambda ev: None)
    bus.start()

    def published() -> tuple[int | None, tuple[int, ...]] | None:
        found = store.list("counted")
        return (found[0].partition_count, tuple(found[0].partitions)) if found else None

    # The count is the group's K, not how many this member holds (a lease call timed out on
    # a loaded machine is taken at a later poll, so wait for the whole share).
    assert wait_for(lambda: published() == (4, (0, 1, 2, 3)), timeout=10), published()
    # and the keys its checkpoints are written under (not the unused "<namespace>:<name>")
    assert store.list("counted")[0].checkpoint_key == "billing:shop.orders#0..3"
    bus.stop(timeout=5)
    assert store.list("counted")[0].partition_count == 4


def test_a_status_is_live_when_fresh_and_neither_stopped_nor_failed() -> None:
    now = datetime.now(timezone.utc)
    assert make_status(heartbeat_at=now).is_live(now)
    assert make_status(heartbeat_at=now, state="stopping").is_live(now)
    assert not make_status(heartbeat_at=now - timedelta(seconds=20)).is_live(now)  # 3 x 5s + 1 missed
    assert not make_status(heartbeat_at=now, state="stopped").is_live(now)
    assert not make_status(heartbeat_at=now, state="failed").is_live(now)


def test_group_views_give_partitions_to_live_members_only() -> None:
    now = datetime.now(timezone.utc)
    # Given the probe's fleet: vm:3345 was SIGKILLed 40 s ago and its last status still names
    # partitions 1 and 3, which vm:3342 took over within seconds.
    survivor = make_member(3342, (0, 1, 2, 3), now)
    killed = make_member(3345, (1, 3), now - timedelta(seconds=40))
    plain = make_status(id="vm:1:audit", bus="audit")  # no group: in no view
    (view,) = group_views([killed, plain, survivor], now)
    assert (view.group, view.namespace, view.partition_count) == ("billing", "shop.orders", 4)
    assert view.members == (survivor,) and view.inactive == (killed,)
    assert view.unheld == () and view.contested == ()
    body = view.to_json(now)
    assert body["members"] == [
        {"id": "vm:3342:orders", "bus": "orders", "host": "vm", "pid": 3342, "partitions": [0, 1, 2, 3]}
    ]
    assert [(m["id"], m["stale"], m["state"]) for m in body["inactive"]] == [
        ("vm:3345:orders", True, "running")
    ]
    assert "partitions" not in body["inactive"][0]  # a stale member claims nothing


def test_group_views_name_unheld_and_contested_partitions() -> None:
    now = datetime.now(timezone.utc)
    # Before the survivor took the dead member's share: 1 and 3 are held by nobody live.
    (view,) = group_views(
        [make_member(1, (0, 2), now), make_member(2, (1, 3), now - timedelta(minutes=1))], now
    )
    assert view.unheld == (1, 3) and view.contested == ()
    # Two live statuses written on either side of a handover both claim partition 2.
    (view,) = group_views([make_member(1, (0, 1, 2), now), make_member(2, (2, 3), now)], now)
    assert view.unheld == () and view.contested == (2,)
    # A member that stopped cleanly, its final status fresh, holds nothing either.
    (view,) = group_views([make_member(1, (0, 1), now), make_member(2, (2, 3), now, state="stopped")], now)
    assert view.unheld == (2, 3) and [s.pid for s in view.inactive] == [2]
    # Without a partition count (statuses from an older publisher) unheld is unknown.
    old = make_status(group="billing", partitions=(0,))
    (view,) = group_views([old], now)
    assert view.partition_count is None and view.unheld is None and view.to_json(now)["unheld"] is None


def test_group_views_are_per_group_and_namespace() -> None:
    now = datetime.now(timezone.utc)
    views = group_views(
        [
            make_member(1, (0, 1, 2, 3), now, namespace="shop.payments"),
            make_member(2, (0, 1, 2, 3), now),
            make_member(3, (0, 1), now, group="audit", partition_count=2),
        ],
        now,
    )
    assert [(v.group, v.namespace, [m.pid for m in v.members]) for v in views] == [
        ("audit", "shop.orders", [3]),
        ("billing", "shop.orders", [2]),
        ("billing", "shop.payments", [1]),
    ]


def test_group_views_take_the_partition_count_of_live_members() -> None:
    now = datetime.now(timezone.utc)
    # Given a group cut from 8 partitions to 4 (README "Changing a group's partitions"): the
    # old members stopped, their final statuses still say 8 until the TTL removes them.
    old = [
        make_member(pid, (), now, state="stopped", status="unhealthy", partition_count=8) for pid in (1, 2)
    ]
    new = [make_member(3, (0, 1), now), make_member(4, (2, 3), now)]
    (view,) = group_views([*old, *new], now)
    # Then K is the live members' 4, and no phantom partitions 4..7 are unheld.
    assert view.partition_count == 4 and view.unheld == ()
    # With no live member at all, the K of whatever reported one still shows.
    (view,) = group_views(old, now)
    assert view.partition_count == 8 and view.unheld == tuple(range(8))
    # A live member from an older publisher (no K) leaves the inactive members' K in use.
    (view,) = group_views([old[0], make_status(group="billing", partitions=(0,))], now)
    assert view.partition_count == 8
