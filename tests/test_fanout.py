"""Fan-out (issue 23): several subscriptions share one work item per event, and stay independent.

While nothing of a document is in flight, one item carries its event for every subscription;
a subscription that is slow, retrying or dead-lettering on a document holds back only its own
later events of that document, exactly as with one lane per subscription and document.
"""

from __future__ import annotations

import random
import threading
from typing import Any

import pymongo
import pytest

import mongo_events as me
from mongo_events.dispatch import FanOut, WorkItem
from mongo_events.subscription import Subscription
from mongo_events.tracking import Slot, Tracker

from .helpers import QUICK, Recorder, change_event, make_dispatcher


def test_a_retrying_subscription_does_not_hold_back_another_on_the_same_document(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    """Given one subscription failing on a document's first event until released, the other
    gets that document's later events meanwhile; both see them in stream order."""
    coll = client.shop.orders
    release = threading.Event()
    flaky, steady = Recorder(), Recorder()
    bus = make_bus(coll, max_workers=2)

    @bus.subscribe(name="flaky", max_retries=1000, retry_backoff=QUICK)
    def on_flaky(ev: me.ChangeEvent) -> None:
        if ev.full_document is not None and ev.full_document["n"] == 0 and not release.is_set():
            raise me.Retry(delay=0.005)
        flaky.add(ev.full_document["n"] if ev.full_document is not None else None)

    @bus.subscribe(name="steady")
    def on_steady(ev: me.ChangeEvent) -> None:
        steady.add(ev.full_document["n"] if ev.full_document is not None else None)

    bus.start()
    coll.insert_one({"_id": 1, "n": 0})
    for i in range(1, 6):
        coll.replace_one({"_id": 1}, {"n": i})
    assert steady.wait(6) == [0, 1, 2, 3, 4, 5]  # while "flaky" still retries event 0
    assert flaky.items == []
    release.set()
    assert flaky.wait(6) == [0, 1, 2, 3, 4, 5]
    assert bus.join(10)


def test_a_blocked_subscription_does_not_hold_back_another_on_the_samechange_event(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    """The first subscription blocks in its callback; an idle worker takes the other's part of
    the same event, and that subscription's later events of the document follow."""
    coll = client.shop.orders
    gate, entered = threading.Event(), threading.Event()
    fast = Recorder()
    bus = make_bus(coll, max_workers=2)

    @bus.subscribe(name="blocked")
    def on_blocked(ev: me.ChangeEvent) -> None:
        entered.set()
        assert gate.wait(10), "held for 10 s"

    @bus.subscribe(name="fast")
    def on_fast(ev: me.ChangeEvent) -> None:
        fast.add(ev.full_document["n"] if ev.full_document is not None else None)

    bus.start()
    try:
        coll.insert_one({"_id": 1, "n": 0})
        assert entered.wait(10)
        assert fast.wait(1) == [0]
        coll.replace_one({"_id": 1}, {"n": 1})
        assert fast.wait(2) == [0, 1]
        assert bus.pending_count() == 2  # "blocked" has neither: the window and the checkpoint wait for it
    finally:
        gate.set()
    assert bus.join(10)


def test_a_dead_lettered_subscription_does_not_affect_the_others_ack(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    """One subscription rejects every event: each is dead-lettered for it, delivered to the
    other, and acked once both are done; the checkpoint passes them all."""
    dlq = me.MemoryDeadLetterStore()
    acks = me.MemoryAckStore()
    good = Recorder()
    bus = make_bus(client.shop.orders, dead_letters=dlq, ack_store=acks)

    @bus.subscribe(name="bad")
    def on_bad(ev: me.ChangeEvent) -> None:
        raise me.Reject("never")

    bus.subscribe(name="good")(lambda ev: good.add(ev.document_key["_id"]))
    bus.start()
    client.shop.orders.insert_many([{"_id": i} for i in range(5)])
    assert sorted(good.wait(5)) == [0, 1, 2, 3, 4]
    assert bus.join(10)
    bus.stop()
    assert len(dlq.list()) == 5
    assert acks.count(me.AckFilter(status=me.AckStatus.ACKED)) == 5
    assert bus.pending_count() == 0


@pytest.mark.parametrize("ordering", ["document", "stream", "none"])
def test_each_subscription_keeps_its_order_with_failures(
    client: pymongo.MongoClient[Any], make_bus: Any, ordering: str
) -> None:
    """Three subscriptions, hot documents, random first-attempt failures: every subscription
    sees every event once (successes), each document's events in stream order (all of them
    in stream order with ``ordering="stream"``; any order with ``"none"``)."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    lock = threading.Lock()
    coll = client.shop.orders
    bus = make_bus(coll, max_workers=4, ordering=ordering)
    seen: dict[str, dict[int, list[int]]] = {}
    everything: dict[str, list[tuple[int, int]]] = {}
    recorders = {}

    def make(name: str, fail_rate: float) -> None:
        rec = Recorder()
        recorders[name] = rec
        attempts: set[tuple[int, int]] = set()

        @bus.subscribe(name=name, max_retries=50, retry_backoff=QUICK)
        def on(ev: me.ChangeEvent) -> None:
            doc = ev.document_key["_id"]
            n = ev.full_document["n"] if ev.full_document is not None else -1
            with lock:
                first = (doc, n) not in attempts
                attempts.add((doc, n))
                fail = first and rng.random() < fail_rate
            if fail:
                raise RuntimeError("first attempt fails")
            with lock:
                seen.setdefault(name, {}).setdefault(doc, []).append(n)
                everything.setdefault(name, []).append((n, doc))
            rec.add((doc, n))

    make("a", 0.0)
    make("b", 0.3)
    make("c", 0.1)
    bus.start()
    docs, rounds = 4, 15
    coll.insert_many([{"_id": d, "n": 0} for d in range(docs)])
    for i in range(1, rounds):
        for d in range(docs):
            coll.replace_one({"_id": d}, {"n": i})
    for rec in recorders.values():
        rec.wait(docs * rounds, timeout=30)
    assert bus.join(10), f"seed {seed}"
    for name in recorders:
        for d in range(docs):
            got = seen[name][d] if ordering != "none" else sorted(seen[name][d])
            assert got == list(range(rounds)), f"seed {seed}: {name} doc {d}: {seen[name][d]}"
        if ordering == "stream":  # inserted round by round, document by document
            assert everything[name] == sorted(everything[name]), f"seed {seed}: {name}"


class Hooks(me.Middleware):
    """Records each hook as (hook, subscription, attempt)."""

    def __init__(self) -> None:
        self.calls = Recorder()

    def before_delivery(self, delivery: me.Delivery) -> None:
        self.calls.add(("before", delivery.subscription, delivery.attempt))

    def after_delivery(self, delivery: me.Delivery, error: BaseException | None, duration: float) -> None:
        self.calls.add(("after", delivery.subscription, delivery.attempt))

    def after_retry_scheduled(self, delivery: me.Delivery, error: BaseException, delay: float) -> None:
        self.calls.add(("retry", delivery.subscription, delivery.attempt))


def test_middleware_and_current_delivery_stay_per_subscription(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    """Each subscription's part gets its own hooks, attempts and Delivery, with or without middleware."""
    hooks = Hooks()
    names = Recorder()
    for round, middleware in enumerate(([hooks], [])):
        bus = make_bus(client.shop[f"orders{len(middleware)}"], middleware=middleware)
        failed = threading.Event()

        @bus.subscribe(name="once-failing", retry_backoff=QUICK)
        def on_failing(ev: me.ChangeEvent) -> None:
            names.add(me.current_delivery().subscription)
            if not failed.is_set():
                failed.set()
                raise RuntimeError("first attempt")

        bus.subscribe(name="plain")(lambda ev: names.add(me.current_delivery().subscription))
        bus.start()
        client.shop[f"orders{len(middleware)}"].insert_one({"_id": 1})
        names.wait(3 * (round + 1))  # two attempts of one, one of the other
        assert bus.join(10)
        bus.stop()
    assert sorted(names.items) == ["once-failing"] * 4 + ["plain"] * 2
    assert sorted(hooks.calls.items) == [
        ("after", "once-failing", 1),
        ("after", "once-failing", 2),
        ("after", "plain", 1),
        ("before", "once-failing", 1),
        ("before", "once-failing", 2),
        ("before", "plain", 1),
        ("retry", "once-failing", 1),
    ]


# -- the lanes, without threads ---------------------------------------------------------------------


def test_a_document_idle_gets_one_item_and_a_busy_one_gets_per_subscription_lanes() -> None:
    done: list[Slot] = []
    dispatcher = make_dispatcher(done)
    tracker = Tracker(100)
    a, b = Subscription(lambda ev: None, name="a", index=0), Subscription(lambda ev: None, name="b", index=1)
    runnable: list[WorkItem | FanOut] = []
    first = tracker.begin("t1", None, 2, "1")
    dispatcher.fan_out([a, b], change_event(1), first, "doc", None, runnable)
    (fan,) = runnable
    assert isinstance(fan, FanOut)
    # "a" finished its part; "b" has not: a second event of the document runs for "a" only.
    fan.finished.append(a)
    runnable.clear()
    second = tracker.begin("t2", None, 2, "2")
    dispatcher.fan_out([a, b], change_event(2), second, "doc", None, runnable)
    assert [(item.sub.name, item.slot) for item in runnable if isinstance(item, WorkItem)] == [("a", second)]
    assert done == [first]  # "a"'s part of the first was reported on the way
    # "b" finishes the first: its part of the second becomes runnable, and the first is done.
    fan.finished.append(b)
    dispatcher.finished.append(fan)
    dispatcher.drain()
    assert done == [first, first]
    released = dispatcher._ready.get_nowait()
    assert isinstance(released, WorkItem) and released.sub is b and released.slot is second
    # Both lanes end: the document is idle again, and its next event is one item again.
    dispatcher.finished.extend([runnable[0], released])
    dispatcher.drain()
    assert done == [first, first, second, second]
    runnable.clear()
    dispatcher.fan_out([a, b], change_event(3), tracker.begin("t3", None, 2, "3"), "doc", None, runnable)
    assert len(runnable) == 1 and isinstance(runnable[0], FanOut)
