"""The durable queue: publish, competing consumers, retries, dead letters, keyed order, stop."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import pymongo
import pytest

import mongo_events as me
from mongo_events.queue import Queue

from ..conftest import wait_for
from ..helpers import QUICK, Recorder


@dataclasses.dataclass
class Order:
    order_id: int
    total: float


@pytest.fixture
def coll(client: pymongo.MongoClient[Any]) -> Any:
    return client.shop.messages


@pytest.fixture
def queues() -> Iterator[list[Queue]]:
    made: list[Queue] = []
    yield made
    for q in made:
        try:
            q.stop(timeout=5)
        except me.ShutdownTimeout:
            pass


def make(coll: Any, queues: list[Queue], **options: Any) -> Queue:
    q = Queue(coll, **{"poll_interval": 0.05, **options})
    queues.append(q)
    return q


def test_publish_is_delivered_decoded_and_acked(coll: Any, queues: list[Queue]) -> None:
    got = Recorder()
    q = make(coll, queues)
    q.subscribe(
        lambda order, delivery: got.add((order, delivery.event.raw["headers"], delivery.attempt)),
        event="order.placed",
        payload=Order,
    )
    q.start()
    seq = q.publish("order.placed", Order(7, 9.5), headers={"trace": "abc"})
    assert got.wait(1) == [(Order(7, 9.5), {"trace": "abc"}, 1)]
    assert wait_for(lambda: q.stats("order.placed").acked == 1)
    assert coll.find_one({"_id": __import__("bson").ObjectId(seq)})["status"] == "acked"
    q.stop()
    assert q.health().status == "unhealthy"


def test_publish_many_one_round_trip_and_every_message_once(coll: Any, queues: list[Queue]) -> None:
    got = Recorder()
    q = make(coll, queues, max_workers=4)
    q.subscribe(lambda p: got.add(p["n"]), event="e")
    ids = q.publish_many([("e", {"n": i}) for i in range(50)])
    assert len(set(ids)) == 50
    q.start()
    assert sorted(got.wait(50)) == list(range(50))
    assert wait_for(lambda: q.stats().acked == 50)
    assert q.stats() == me.queue.QueueStats(pending=0, inflight=0, acked=50, total=50)


def test_failure_retries_in_process_then_dead_letters_and_acks(coll: Any, queues: list[Queue]) -> None:
    letters = Recorder()
    attempts = Recorder()

    def fail(p: dict[str, Any], d: me.Delivery) -> None:
        attempts.add(d.attempt)
        raise ValueError("boom")

    q = make(coll, queues, dead_letters=lambda ev, sub, err, n: letters.add((ev.full_document, sub, n)))
    q.subscribe(fail, event="e", max_retries=2, retry_backoff=QUICK)
    q.start()
    q.publish("e", {"n": 1})
    assert letters.wait(1) == [({"n": 1}, "e", 3)]
    assert attempts.items == [1, 2, 3]
    assert wait_for(lambda: q.stats("e").acked == 1)


def test_attempts_continue_from_the_stored_retry_count(coll: Any, queues: list[Queue]) -> None:
    """A message nacked by earlier consumers has used retries: max_retries counts them."""
    seen = Recorder()
    store = me.queue.MessageStore(coll)
    seq = store.append("e", {"n": 1})
    for _ in range(2):
        store.claim("e", owner="old")
        store.nack("e", seq)
    q = make(coll, queues, dead_letters=lambda ev, sub, err, n: seen.add(("dead", n)))

    def fail(p: dict[str, Any], d: me.Delivery) -> None:
        seen.add(d.attempt)
        raise me.Retry(0.001, "again")

    q.subscribe(fail, event="e", max_retries=3)
    q.start()
    assert seen.wait(3) == [3, 4, ("dead", 4)]


def test_give_up_with_stop_nacks_the_message_and_fails_the_queue(coll: Any, queues: list[Queue]) -> None:
    q = make(coll, queues)
    q.subscribe(lambda p: (_ for _ in ()).throw(me.Reject("bad")), event="e")
    q.start()
    seq = q.publish("e", {"n": 1})
    assert wait_for(lambda: q.error is not None)
    assert isinstance(q.error, me.HandlerFailed)
    assert wait_for(lambda: coll.find_one()["status"] == "pending")
    assert coll.find_one()["retry_count"] == 1 and str(coll.find_one()["_id"]) == seq
    assert q.health().status == "unhealthy"


def test_competing_consumers_share_messages_each_handled_once(coll: Any, queues: list[Queue]) -> None:
    got = Recorder()
    for name in ("a", "b", "c"):
        q = make(coll, queues, name=name, max_workers=2)
        q.subscribe(lambda p, d, name=name: got.add((p["n"], d.bus)), event="job")
        q.start()
    publisher = Queue(coll)
    publisher.publish_many([("job", {"n": i}) for i in range(300)])
    items = got.wait(300, timeout=30)
    assert sorted(n for n, _ in items) == list(range(300))  # each once: no message claimed twice
    assert wait_for(lambda: publisher.stats("job").acked == 300, 10)


def test_ordered_keys_run_one_at_a_time_in_publish_order(coll: Any, queues: list[Queue]) -> None:
    got = Recorder()
    active: dict[str, int] = {}
    overlap: list[str] = []
    lock = threading.Lock()

    def handle(p: dict[str, Any]) -> None:
        with lock:
            active[p["k"]] = active.get(p["k"], 0) + 1
            if active[p["k"]] > 1:
                overlap.append(p["k"])
        got.add((p["k"], p["n"]))
        with lock:
            active[p["k"]] -= 1

    for name in ("a", "b"):
        q = make(coll, queues, name=name, max_workers=4)
        q.subscribe(handle, event="e", ordered=True)
        q.start()
    Queue(coll).publish_many([("e", {"k": f"k{i % 3}", "n": i}, f"k{i % 3}") for i in range(60)])
    items = got.wait(60, timeout=30)
    for key in ("k0", "k1", "k2"):
        ns = [n for k, n in items if k == key]
        assert ns == sorted(ns) and len(ns) == 20
    assert overlap == []


def test_stop_gives_back_unstarted_messages_without_counting_a_retry(coll: Any, queues: list[Queue]) -> None:
    release = threading.Event()
    started = Recorder()

    def slow(p: dict[str, Any]) -> None:
        started.add(p["n"])
        release.wait(10)

    q = make(coll, queues, max_workers=1, prefetch=5)
    q.subscribe(slow, event="e")
    q.publish_many([("e", {"n": i}) for i in range(5)])
    q.start()
    started.wait(1)
    assert wait_for(lambda: q.stats("e").inflight == 5)
    threading.Timer(0.2, release.set).start()
    q.stop(timeout=10)
    stats = q.stats("e")
    assert stats.acked == 1 and stats.pending == 4 and stats.inflight == 0
    assert all(d["retry_count"] == 0 for d in coll.find({"status": "pending"}))


def test_configuration_errors(coll: Any) -> None:
    q = Queue(coll)
    q.subscribe(lambda p: None, event="e")
    with pytest.raises(me.ConfigurationError):
        q.subscribe(lambda p: None, event="e")
    with pytest.raises(me.ConfigurationError):
        Queue(coll, poll_interval=0)
    with pytest.raises(me.ConfigurationError):
        Queue(coll).start()
    with pytest.raises(me.ConfigurationError):
        q.publish("e", [1])


def test_context_manager_starts_and_stops(coll: Any) -> None:
    got = Recorder()
    Queue(coll).publish("e", {"n": 1})
    q2 = Queue(coll, poll_interval=0.05)
    q2.subscribe(lambda p: got.add(p["n"]), event="e")
    with q2:
        assert q2.health().status == "healthy" and q2.health().signal == "none"
        assert got.wait(1) == [1]
    assert q2.health().running is False


def test_idempotency_skips_a_message_already_completed_and_acks_it(coll: Any, queues: list[Queue]) -> None:
    """A message redelivered after its consumer died between callback and ack runs no second effect."""
    from datetime import timedelta

    store = me.MemoryIdempotencyStore()
    got = Recorder()
    q = make(coll, queues)
    q.subscribe(lambda p: got.add(p["n"]), event="e", idempotency=store)
    first = q.publish("e", {"n": 1})
    store.try_claim(f"e:{first}", timedelta(seconds=60))
    store.complete(f"e:{first}")  # as if an earlier consumer handled it and died before its ack
    q.publish("e", {"n": 2})
    q.start()
    assert got.wait(1) == [2]
    assert wait_for(lambda: q.stats("e").acked == 2)
    assert got.items == [2]


def test_middleware_sees_every_attempt(coll: Any, queues: list[Queue]) -> None:
    seen = Recorder()

    class Spy(me.Middleware):
        def after_delivery(self, delivery: me.Delivery, error: BaseException | None, duration: float) -> None:
            seen.add((delivery.bus, delivery.subscription, delivery.attempt, type(error).__name__))

    calls = []

    def flaky(p: dict[str, Any]) -> None:
        calls.append(p)
        if len(calls) == 1:
            raise me.Retry(0.001, "once")

    q = make(coll, queues, name="jobs", middleware=[Spy()])
    q.subscribe(flaky, event="e")
    q.start()
    q.publish("e", {"n": 1})
    assert seen.wait(2) == [("jobs", "e", 1, "Retry"), ("jobs", "e", 2, "NoneType")]


def test_metrics_and_monitor_see_queue_deliveries(coll: Any, queues: list[Queue]) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from mongo_events.monitor import MemoryMonitorStore

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monitor = MemoryMonitorStore()
    got = Recorder()
    q = make(coll, queues, metrics=me.Metrics(meter_provider=provider), monitor=monitor)
    q.subscribe(lambda p: got.add(p["n"]), event="e")
    q.start()
    seq = q.publish("e", {"n": 1})
    got.wait(1)
    q.stop()
    entry = monitor.get(seq, "e")
    assert entry is not None and str(entry.status) == "completed"
    data = reader.get_metrics_data()
    processed = [
        p.value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "mongodb.changes.processed"
        for p in m.data.data_points
        if dict(p.attributes or {}).get("event") == "e"
    ]
    provider.shutdown()
    assert processed == [1]


def test_a_long_callback_keeps_its_message_by_renewing_visibility(coll: Any, queues: list[Queue]) -> None:
    release = threading.Event()
    got = Recorder()

    def slow(p: dict[str, Any], d: me.Delivery) -> None:
        got.add(d.bus)
        release.wait(20)

    a = make(coll, queues, name="a", visibility_timeout=0.6)
    a.subscribe(slow, event="e")
    a.start()
    a.publish("e", {"n": 1})
    got.wait(1)
    b = make(coll, queues, name="b", visibility_timeout=0.6)
    b.subscribe(slow, event="e")
    b.start()
    seen: set[Any] = set()

    def renewed_three_times() -> bool:
        doc = coll.find_one()
        seen.add(doc.get("inflight_at"))
        return len(seen) >= 4  # the claim's inflight_at and three renewals: well past 0.6 s

    assert wait_for(renewed_three_times, 10)
    assert got.items == ["a"] and coll.find_one()["owner"] == a.consumer_id
    release.set()
    assert wait_for(lambda: a.stats("e").acked == 1)
    assert got.items == ["a"]
