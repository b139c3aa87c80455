"""Coalescing (issue 20): ``Bus(coalesce=True)``, Go's ``CoalesceByDocumentKey``.

Of a backlog of one document's events waiting in its lane, only the newest is delivered
per subscription; the replaced ones are done when it is, never before. Scenarios hold a
callback on an ``Event`` so the backlog forms deterministically, then read the bus.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pymongo
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import mongo_events as me
from mongo_events.dispatch import CoalescingLanes, WorkItem
from mongo_events.subscription import Subscription
from mongo_events.tracking import Tracker

from .conftest import wait_for
from .helpers import QUICK, Recorder

N = 100


def _n(ev: me.ChangeEvent) -> Any:
    # replace events carry the document as of that event (an updateLookup would read it later)
    return ev.full_document["n"] if ev.full_document is not None else None


class Held:
    """A callback gate: ``hold(n)`` blocks the callback on event ``n`` until ``release(n)``."""

    def __init__(self, *held: int) -> None:
        self.gates = {n: threading.Event() for n in held}
        self.entered = {n: threading.Event() for n in held}

    def __call__(self, n: Any) -> None:
        if n in self.gates:
            self.entered[n].set()
            assert self.gates[n].wait(10), f"event {n} was held for 10 s"

    def wait_entered(self, n: int) -> None:
        assert self.entered[n].wait(10), f"the callback never got event {n}"

    def release(self, n: int | None = None) -> None:
        for key, gate in self.gates.items():
            if n is None or key == n:
                gate.set()


@pytest.fixture
def held() -> Iterator[Callable[..., Held]]:
    """``held(n, ...)`` makes a gate; every one is opened at the end, so no worker stays blocked."""
    gates: list[Held] = []

    def make(*ns: int) -> Held:
        gates.append(Held(*ns))
        return gates[-1]

    yield make
    for gate in gates:
        gate.release()


def _backlog(coll: Any, gate: Held, bus: me.Bus, count: int, first: int = 1) -> None:
    """Insert ``_id`` 1 (n=0), wait for its callback to block, then replace it ``count`` times."""
    coll.insert_one({"_id": 1, "n": 0})
    gate.wait_entered(0)
    for i in range(first, first + count):
        coll.replace_one({"_id": 1}, {"n": i})


# -- what is delivered -----------------------------------------------------------------------------


def test_a_slow_document_gets_only_the_newest_of_its_backlog(
    client: pymongo.MongoClient[Any], make_bus: Any, held: Callable[..., Held]
) -> None:
    coll = client.shop.orders
    gate = held(0)
    rec = Recorder()
    bus = make_bus(coll, coalesce=True)

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        gate(_n(ev))
        rec.add(_n(ev))

    bus.start()
    _backlog(coll, gate, bus, N)
    # Given all 100 updates waiting behind the held insert, 99 of them replaced ...
    assert wait_for(lambda: bus.coalesced == N - 1, timeout=10), bus.coalesced
    gate.release()
    # ... then the insert and the newest update are delivered, and that is all.
    assert bus.join(10)
    assert rec.items == [0, N]
    assert bus.coalesced == N - 1
    assert bus.pending_count() == 0  # the replaced ones count as done


def test_without_coalesce_every_event_is_delivered(
    client: pymongo.MongoClient[Any], make_bus: Any, held: Callable[..., Held]
) -> None:
    coll = client.shop.orders
    gate = held(0)
    rec = Recorder()
    bus = make_bus(coll)  # coalesce=False, the default

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        gate(_n(ev))
        rec.add(_n(ev))

    bus.start()
    _backlog(coll, gate, bus, N)
    assert wait_for(lambda: bus.pending_count() == N + 1, timeout=10)  # all admitted, one held
    gate.release()
    assert bus.join(10)
    assert rec.items == list(range(N + 1))
    assert bus.coalesced == 0


def test_other_documents_are_not_coalesced_and_each_keeps_its_order(
    client: pymongo.MongoClient[Any], make_bus: Any, held: Callable[..., Held]
) -> None:
    coll = client.shop.orders
    gate = held(0)
    rec = Recorder()
    bus = make_bus(coll, coalesce=True, max_workers=4)

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        if ev.document_id == 1:
            gate(_n(ev))
        rec.add((ev.document_id, _n(ev)))

    bus.start()
    _backlog(coll, gate, bus, 20)
    # Other documents run while _id 1 is held: each event of theirs waits for the one before
    # it to be delivered, so none of them ever has a backlog to coalesce.
    for i in range(2, 12):
        coll.insert_one({"_id": i, "n": 0})
        rec.wait_until(lambda items, i=i: (i, 0) in items)
        coll.replace_one({"_id": i}, {"n": 1})
        rec.wait_until(lambda items, i=i: (i, 1) in items)
    assert bus.coalesced == 19  # only _id 1's backlog
    gate.release()
    assert bus.join(10)
    per_doc: dict[Any, list[Any]] = {}
    for key, n in rec.items:
        per_doc.setdefault(key, []).append(n)
    assert per_doc.pop(1) == [0, 20]
    assert per_doc == {i: [0, 1] for i in range(2, 12)}


def test_per_document_order_holds_under_concurrent_backlogs(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    """Five documents updated in bursts by a slowish handler: whatever is coalesced, each
    document's deliveries rise strictly and end with its newest state."""
    coll = client.shop.orders
    rec = Recorder()
    # Never set: a 2 ms pause per callback lets backlogs form. Not a synchronisation: the
    # assertions hold whether or not (and however much) anything was coalesced.
    slow = threading.Event()
    bus = make_bus(coll, coalesce=True, max_workers=3)

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        slow.wait(0.002)
        rec.add((ev.document_id, _n(ev)))

    bus.start()
    docs = range(5)
    coll.insert_many([{"_id": d, "n": 0} for d in docs])
    for i in range(1, 41):
        for d in docs:
            coll.replace_one({"_id": d}, {"n": i})
    rec.wait_until(lambda items: all((d, 40) in items for d in docs))
    assert bus.join(10)
    for d in docs:
        seen = [n for key, n in rec.items if key == d]
        assert seen == sorted(set(seen)) and seen[0] == 0 and seen[-1] == 40, (d, seen)
    assert len(rec.items) + bus.coalesced == 5 * 41  # each event delivered or coalesced, once


def test_two_subscriptions_coalesce_independently(
    client: pymongo.MongoClient[Any], make_bus: Any, held: Callable[..., Held]
) -> None:
    """Coalescing is per subscription: a held one coalesces its backlog, while one that keeps
    up gets every event of the same document."""
    coll = client.shop.orders
    gate = held(0)
    slow, fast = Recorder(), Recorder()
    bus = make_bus(coll, coalesce=True)

    @bus.subscribe(name="slow")
    def on_slow(ev: me.ChangeEvent) -> None:
        gate(_n(ev))
        slow.add(_n(ev))

    @bus.subscribe(name="fast")
    def on_fast(ev: me.ChangeEvent) -> None:
        fast.add(_n(ev))

    bus.start()
    coll.insert_one({"_id": 1, "n": 0})
    gate.wait_entered(0)
    for i in range(1, 21):
        coll.replace_one({"_id": 1}, {"n": i})
        fast.wait_until(lambda items, i=i: i in items)  # "fast" never has a backlog
    assert bus.coalesced == 19
    gate.release()
    assert bus.join(10)
    assert slow.items == [0, 20]
    assert fast.items == list(range(21))


# -- the watermark -----------------------------------------------------------------------------------


def test_the_checkpoint_waits_for_the_replacement_and_a_crash_redelivers(
    client: pymongo.MongoClient[Any], make_bus: Any, held: Callable[..., Held]
) -> None:
    """A crash after the replaced events were counted, before their replacement finished, must
    not lose the document's newest state: the stored checkpoint stays at the last event done."""
    coll = client.shop.orders
    store = me.MemoryResumeTokenStore()
    gate = held(0, 30)
    tokens: dict[Any, Any] = {}
    bus = make_bus(coll, coalesce=True, resume_token_store=store, resume_token_id="w")

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        tokens[_n(ev)] = ev.resume_token
        gate(_n(ev))

    bus.start()
    _backlog(coll, gate, bus, 30)
    assert wait_for(lambda: bus.coalesced == 29, timeout=10)
    before = bus.checkpoint
    assert before != tokens[0]  # the held insert is not done: nothing passed it
    gate.release(0)
    gate.wait_entered(30)  # the newest runs (and blocks); 29 replaced events wait on it
    # The insert is done, so the checkpoint moves to it and no further, in memory and stored.
    assert wait_for(lambda: bus.checkpoint == tokens[0], timeout=5), bus.checkpoint
    assert bus.flush()
    assert store.load(bus.resume_token_key).token == tokens[0]
    assert bus.pending_count() == 30
    assert bus.in_flight >= 30  # the replaced events stay in the window until it finishes
    # Crash now, between the replacement's callback and its checkpoint (a stop that gives up on it).
    with pytest.raises(me.ShutdownTimeout):
        bus.stop(timeout=0.2)
    assert store.load(bus.resume_token_key).token == tokens[0]
    gate.release()

    # The restart resumes after the insert: the first replaced event comes again, and the newest.
    again = Recorder()
    second = make_bus(coll, coalesce=True, resume_token_store=store, resume_token_id="w")
    second.subscribe(lambda ev: again.add(_n(ev)))
    second.start()
    got = again.wait_until(lambda items: 30 in items)
    assert got[0] == 1 and got[-1] == 30 and got == sorted(set(got))
    assert second.join(10)
    assert len(again.items) + second.coalesced == 30


def test_the_checkpoint_passes_replaced_events_once_their_replacement_is_done(
    client: pymongo.MongoClient[Any], make_bus: Any, held: Callable[..., Held]
) -> None:
    coll = client.shop.orders
    store = me.MemoryResumeTokenStore()
    gate = held(0)
    tokens: dict[Any, Any] = {}
    bus = make_bus(coll, coalesce=True, resume_token_store=store, resume_token_id="w")

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        tokens[_n(ev)] = ev.resume_token
        gate(_n(ev))

    bus.start()
    _backlog(coll, gate, bus, 10)
    assert wait_for(lambda: bus.coalesced == 9, timeout=10)
    gate.release()
    assert bus.join(10)
    assert bus.pending_count() == 0
    assert bus.flush()
    stored = store.load(bus.resume_token_key).token
    assert stored not in (tokens[0], None)
    # Resuming from it delivers nothing old: only a new change.
    bus.stop(5)
    again = Recorder()
    second = make_bus(coll, coalesce=True, resume_token_store=store, resume_token_id="w")
    second.subscribe(lambda ev: again.add(_n(ev)))
    second.start()
    coll.replace_one({"_id": 1}, {"n": 99})
    assert again.wait(1) == [99]
    assert second.join(10)
    assert again.items == [99]


# -- retries, dead letters, idempotency ----------------------------------------------------------


def test_an_event_being_retried_is_not_replaced(
    client: pymongo.MongoClient[Any], make_bus: Any, held: Callable[..., Held]
) -> None:
    coll = client.shop.orders
    gate = held(0)
    rec = Recorder()
    bus = make_bus(coll, coalesce=True)

    @bus.subscribe(retry_backoff=QUICK, max_retries=3)
    def handle(ev: me.ChangeEvent, delivery: me.Delivery) -> None:
        rec.add((_n(ev), delivery.attempt))
        if _n(ev) == 0 and delivery.attempt == 1:
            gate(0)
            raise RuntimeError("first attempt fails after the backlog formed")

    bus.start()
    _backlog(coll, gate, bus, 10)
    assert wait_for(lambda: bus.coalesced == 9, timeout=10)
    gate.release()
    assert bus.join(10)
    assert rec.items == [(0, 1), (0, 2), (10, 1)]  # the retry ran; only the newest followed


def test_a_dead_lettered_replacement_carries_the_events_it_replaced(
    client: pymongo.MongoClient[Any], make_bus: Any, held: Callable[..., Held]
) -> None:
    """The dead letter holds the newest event only; the replaced ones are done with it."""
    coll = client.shop.orders
    gate = held(0)
    dead = Recorder()
    bus = make_bus(coll, coalesce=True, dead_letters=lambda ev, sub, err, n: dead.add(_n(ev)))

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        gate(_n(ev))
        if _n(ev) == 10:
            raise me.Reject("the newest state is rejected")

    bus.start()
    _backlog(coll, gate, bus, 10)
    assert wait_for(lambda: bus.coalesced == 9, timeout=10)
    gate.release()
    assert bus.join(10)
    assert dead.items == [10]
    assert bus.pending_count() == 0 and bus.state is me.BusState.RUNNING


def test_a_replacement_that_stops_the_bus_leaves_the_checkpoint_before_what_it_replaced(
    client: pymongo.MongoClient[Any], make_bus: Any, held: Callable[..., Held]
) -> None:
    """``on_exhausted="stop"`` on the newest event: the bus fails, and the events it replaced
    are not done either, so a restart delivers them (and it) again."""
    coll = client.shop.orders
    store = me.MemoryResumeTokenStore()
    gate = held(0)
    tokens: dict[Any, Any] = {}
    bus = make_bus(coll, coalesce=True, resume_token_store=store, resume_token_id="w")

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        tokens[_n(ev)] = ev.resume_token
        gate(_n(ev))
        if _n(ev) == 10:
            raise me.Reject("no dead-letter store: the bus stops")

    bus.start()
    _backlog(coll, gate, bus, 10)
    assert wait_for(lambda: bus.coalesced == 9, timeout=10)
    gate.release()
    assert wait_for(lambda: bus.state is me.BusState.FAILED, timeout=10)
    assert isinstance(bus.error, me.HandlerFailed)
    assert store.load(bus.resume_token_key).token == tokens[0]


def test_replaced_events_never_reach_the_idempotency_store(
    client: pymongo.MongoClient[Any], make_bus: Any, held: Callable[..., Held]
) -> None:
    coll = client.shop.orders
    gate = held(0)
    store = me.MemoryIdempotencyStore()
    ids = Recorder()
    bus = make_bus(coll, coalesce=True, idempotency=store)

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        gate(_n(ev))
        ids.add(ev.id)

    bus.start()
    _backlog(coll, gate, bus, 10)
    assert wait_for(lambda: bus.coalesced == 9, timeout=10)
    gate.release()
    assert bus.join(10)
    assert len(ids.items) == 2
    assert len(store) == 2  # one record per delivered event, none for the 9 replaced


# -- metrics and options -------------------------------------------------------------------------------


def test_metrics_count_coalesced_events(
    client: pymongo.MongoClient[Any], make_bus: Any, held: Callable[..., Held]
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        coll = client.shop.orders
        gate = held(0)
        bus = make_bus(coll, coalesce=True, metrics=me.Metrics(meter_provider=provider))

        @bus.subscribe(name="audit")
        def handle(ev: me.ChangeEvent) -> None:
            gate(_n(ev))

        bus.start()
        _backlog(coll, gate, bus, 10)
        assert wait_for(lambda: bus.coalesced == 9, timeout=10)
        gate.release()
        assert bus.join(10)
        data = reader.get_metrics_data()
        assert data is not None
        found = [
            (dict(p.attributes or {}), p.value)
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == "mongodb.events.coalesced"
            for p in metric.data.data_points
        ]
        assert found == [({"event": "audit", "operation": "replace", "namespace": "shop.orders"}, 9)]
    finally:
        provider.shutdown()


@pytest.mark.parametrize("ordering", ["stream", "none"])
def test_coalesce_is_refused_with_stream_or_no_ordering(
    client: pymongo.MongoClient[Any], ordering: str
) -> None:
    with pytest.raises(me.ConfigurationError) as info:
        me.Bus(client.shop.orders, coalesce=True, ordering=ordering)  # type: ignore[arg-type]
    message = str(info.value)
    assert "coalesce=True" in message and f"ordering={ordering!r}" in message, message
    assert "ordering='document'" in message  # says what works
    me.Bus(client.shop.orders, coalesce=False, ordering=ordering)  # type: ignore[arg-type]


# -- the lanes themselves --------------------------------------------------------------------------


def _item(tracker: Tracker, sub: Subscription, key: Any, lane: Any) -> WorkItem:
    raw = {
        "_id": {"_data": f"{tracker.last_seq + 1:04x}"},
        "operationType": "update" if key is not None else "drop",
        "ns": {"db": "d", "coll": "c"},
        **({"documentKey": {"_id": key}} if key is not None else {}),
    }
    event = me.ChangeEvent.from_raw(raw)
    slot = tracker.begin(raw["_id"], None, 1, event.id)
    return WorkItem(sub, event, slot, lane, None)


def test_lanes_replace_only_a_waiting_item_of_the_same_document_and_subscription() -> None:
    tracker = Tracker(100)
    a, b = Subscription(lambda ev: None, name="a", index=0), Subscription(lambda ev: None, name="b", index=1)
    replaced: list[WorkItem] = []
    lanes = CoalescingLanes(replaced.append)
    first = _item(tracker, a, 1, "L")
    assert lanes.push("L", first) is first  # the active item: runs, is never replaced
    second = _item(tracker, a, 1, "L")
    assert lanes.push("L", second) is None
    third = _item(tracker, a, 1, "L")
    assert lanes.push("L", third) is None
    fourth = _item(tracker, a, 1, "L")
    assert lanes.push("L", fourth) is None
    assert replaced == [second, third] and lanes.coalesced == 2
    assert fourth.covered == [second.slot, third.slot]
    # A keyless (barrier) event neither replaces nor is replaced; another subscription's item neither.
    barrier = _item(tracker, a, None, "L")
    assert lanes.push("L", barrier) is None
    after = _item(tracker, a, 1, "L")
    assert lanes.push("L", after) is None
    other = _item(tracker, b, 1, "L")
    assert lanes.push("L", other) is None
    assert lanes.coalesced == 2
    assert [lanes.pop_next("L") for _ in range(5)] == [fourth, barrier, after, other, None]


def test_a_replaced_slot_is_finished_only_with_its_replacement() -> None:
    """The dispatcher reports a replacement's covered slots with its own: before that the
    watermark cannot pass the oldest replaced event."""
    tracker = Tracker(100)
    sub = Subscription(lambda ev: None, name="a")
    lanes = CoalescingLanes()
    items = [_item(tracker, sub, 1, "L") for _ in range(4)]
    for item in items:
        lanes.push("L", item)
    tracker.finish(items[0].slot)
    tracker.advance()
    checkpoint = tracker.checkpoint
    assert checkpoint == items[0].slot.token
    newest = items[-1]
    assert newest.covered == [items[1].slot, items[2].slot]
    tracker.finish(newest.slot)  # the newest alone: the replaced ones still hold the watermark
    tracker.advance()
    assert tracker.checkpoint == checkpoint
    for slot in newest.covered:
        tracker.finish(slot)
    tracker.advance()
    assert tracker.checkpoint == newest.slot.token and tracker.idle
