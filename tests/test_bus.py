"""The bus end to end: real pymongo against the fake replica set."""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from datetime import timedelta
from typing import Any, TypedDict

import attrs
import pymongo
import pytest
from bson import ObjectId
from pymongo import monitoring

import mongo_events as me
from mongo_events.testing import FakeReplicaSet
from mongo_events.testing.oplog import parse_token

from .conftest import CLIENT_OPTIONS, wait_for
from .helpers import FAST, Recorder


@dataclasses.dataclass
class Order:
    _id: int
    sku: str
    qty: int


@attrs.define
class OrderEvent:
    operation_type: str
    document_key: dict[str, Any]
    full_document: Order | None


class OrderDict(TypedDict):
    _id: int
    sku: str
    qty: int


# -- 1. watch levels, options, event types, payloads ----------------------------------


def test_collection_watch_delivers_each_event_type_with_fields(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    coll = client.shop.orders
    coll.insert_one({"_id": 0})
    rec = Recorder()
    bus = make_bus(coll, full_document=me.FullDocument.UPDATE_LOOKUP, update_description=True)
    bus.subscribe(lambda ev, d: rec.add((ev, d)))
    bus.start()
    assert bus.state is me.BusState.RUNNING
    coll.insert_one({"_id": 1, "sku": "a", "qty": 1})
    coll.update_one({"_id": 1}, {"$set": {"qty": 2}, "$unset": {"sku": ""}})
    coll.replace_one({"_id": 1}, {"sku": "b", "qty": 3})
    coll.delete_one({"_id": 1})
    got = rec.wait(4)
    ops = [ev.operation_type for ev, _ in got]
    assert ops == [
        me.OperationType.INSERT,
        me.OperationType.UPDATE,
        me.OperationType.REPLACE,
        me.OperationType.DELETE,
    ]
    ins, upd, rep, dele = (ev for ev, _ in got)
    assert ins.full_document == {"_id": 1, "sku": "a", "qty": 1} and ins.namespace == "shop.orders"
    assert upd.update_description is not None and upd.update_description.updated_fields == {"qty": 2}
    assert upd.update_description.removed_fields == ("sku",)
    assert upd.full_document is None or upd.full_document["_id"] == 1  # looked up (may be gone by now)
    assert rep.full_document == {"_id": 1, "sku": "b", "qty": 3}
    assert dele.document_key == {"_id": 1} and dele.full_document is None
    delivery = got[1][1]
    assert isinstance(delivery, me.Delivery)
    assert delivery.attempt == 1 and delivery.subscription.endswith("<lambda>")
    assert delivery.update_description == upd.update_description
    assert delivery.cluster_time == upd.cluster_time
    assert got[0][1].update_description is None  # inserts carry none


def test_database_and_cluster_watch(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    db_rec, cluster_rec = Recorder(), Recorder()
    db_bus = make_bus(client.shop)
    db_bus.subscribe(db_rec.add)
    cluster_bus = make_bus(client)
    cluster_bus.subscribe(cluster_rec.add)
    db_bus.start()
    cluster_bus.start()
    assert db_bus.resume_token_key.startswith("shop.*:") and cluster_bus.resume_token_key.startswith("*.*:")
    client.shop.orders.insert_one({"_id": 1})
    client.shop.customers.insert_one({"_id": 2})
    client.other.things.insert_one({"_id": 3})
    got = db_rec.wait(2)
    # Two documents: the workers may finish them in either order (order holds per document).
    assert sorted(e.collection for e in got) == ["customers", "orders"]
    seen = cluster_rec.wait_until(
        lambda items: {e.namespace for e in items} >= {"shop.orders", "shop.customers", "other.things"}
    )
    # Each bus's own checkpoint writes are not delivered to it. (The cluster bus may see the
    # database bus's writes to shop._event_resume_tokens: another consumer's data, no loop.)
    assert not any(e.namespace == "shop._event_resume_tokens" for e in db_rec.items)
    assert not any(e.namespace == "admin._event_resume_tokens" for e in seen)
    db_bus.stop()
    cluster_bus.stop()
    assert client.shop["_event_resume_tokens"].find_one({"_id": db_bus.resume_token_key}) is not None
    assert client.admin["_event_resume_tokens"].find_one({"_id": cluster_bus.resume_token_key}) is not None


def test_database_watch_does_not_loop_on_its_own_checkpoints(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    rec = Recorder()
    bus = make_bus(client.shop)
    bus.subscribe(rec.add)
    bus.start()
    client.shop.orders.insert_many([{"_id": i} for i in range(3)])
    rec.wait(3)
    bus.join(5)
    bus.flush()
    writes = fake_rs.command_count("update")
    client.shop.orders.insert_one({"_id": 99})
    rec.wait(4)
    bus.join(5)
    bus.flush()
    bus.flush()
    assert fake_rs.command_count("update") - writes <= 2
    assert len(rec) == 4


def test_typed_payloads_decode_into_dataclass_attrs_typeddict_and_dict(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    coll = client.shop.orders
    docs, events, dicts, raws = Recorder(), Recorder(), Recorder(), Recorder()
    bus = make_bus(coll, full_document=me.FullDocument.UPDATE_LOOKUP)
    bus.subscribe(payload=OrderEvent, name="events")(events.add)

    @bus.subscribe(payload=dict, name="raw")
    def raw(doc: dict[str, Any]) -> None:
        raws.add(doc)

    bus.start()
    coll.insert_one({"_id": 1, "sku": "a", "qty": 2})
    (ev,) = events.wait(1)
    assert ev == OrderEvent("insert", {"_id": 1}, Order(1, "a", 2))
    assert raws.wait(1)[0]["operation_type"] == "insert"
    bus.stop()

    only = make_bus(
        client.shop.orders, full_document=me.FullDocument.UPDATE_LOOKUP, full_document_only=True, resume=False
    )
    only.subscribe(payload=Order, name="dc")(docs.add)
    only.subscribe(payload=OrderDict, name="td")(dicts.add)
    only.start()
    coll.insert_one({"_id": 2, "sku": "b", "qty": 3})
    coll.delete_one({"_id": 2})
    got = docs.wait(2)
    assert got[0] == Order(2, "b", 3)
    assert got[1] == {"_id": 2}  # deletes hand over the document key
    assert dicts.wait(2)[0] == {"_id": 2, "sku": "b", "qty": 3}


def test_an_undecodable_document_is_reported_with_its_path_and_not_retried(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    dead = Recorder()
    calls = Recorder()
    bus = make_bus(
        client.shop.orders,
        full_document=me.FullDocument.UPDATE_LOOKUP,
        full_document_only=True,
        dead_letters=lambda event, sub, error, attempts: dead.add((event, sub, error, attempts)),
    )
    bus.subscribe(payload=Order, name="orders")(calls.add)
    bus.start()
    client.shop.orders.insert_one({"_id": 1, "sku": "a", "qty": "many"})
    client.shop.orders.insert_one({"_id": 2, "sku": "b", "qty": 1})
    (event, sub, error, attempts) = dead.wait(1)[0]
    assert sub == "orders" and attempts == 1
    assert isinstance(error, me.DecodeError)
    assert any("$.qty" in e for e in error.errors)
    assert event.document_key == {"_id": 1}
    assert calls.wait(1) == [Order(2, "b", 1)]  # the stream moved on


def test_undecodable_without_dead_letters_stops_the_bus(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    bus = make_bus(client.shop.orders, full_document=me.FullDocument.UPDATE_LOOKUP, full_document_only=True)
    bus.subscribe(payload=Order, name="orders")(lambda o: None)
    bus.start()
    client.shop.orders.insert_one({"_id": 1, "qty": "x"})
    with pytest.raises(me.HandlerFailed) as info:
        bus.run_forever()
    assert isinstance(info.value.__cause__, me.DecodeError)
    assert bus.state is me.BusState.FAILED
    assert bus.token_store is not None
    stored = bus.token_store.load(bus.resume_token_key)
    assert stored is None or stored.token != info.value.event_id  # the checkpoint stays before the event


def test_operations_filter_and_empty_updates(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    coll = client.shop.orders
    inserts, everything = Recorder(), Recorder()
    # The $addFields stage empties the update description, as an internal no-op update would.
    bus = make_bus(coll, pipeline=[{"$addFields": {"updateDescription.updatedFields": {"$literal": {}}}}])
    bus.subscribe(operations={"insert"}, name="inserts")(inserts.add)
    bus.subscribe(name="all")(everything.add)
    bus.start()
    coll.insert_one({"_id": 1})
    coll.update_one({"_id": 1}, {"$set": {"a": 1}})
    coll.delete_one({"_id": 1})
    got = everything.wait(2)
    assert [e.operation_type for e in got] == ["insert", "delete"]  # the empty update was skipped
    assert [e.operation_type for e in inserts.wait(1)] == ["insert"]
    bus.stop()

    keep = Recorder()
    bus2 = make_bus(
        coll,
        include_empty_updates=True,
        resume=False,
        pipeline=[{"$addFields": {"updateDescription.updatedFields": {"$literal": {}}}}],
    )
    bus2.subscribe(keep.add)
    bus2.start()
    coll.insert_one({"_id": 2})
    coll.update_one({"_id": 2}, {"$set": {"a": 1}})
    assert [e.operation_type for e in keep.wait(2)] == ["insert", "update"]


def test_max_updated_fields_size_drops_big_updated_fields_and_keeps_removed(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    coll = client.shop.orders
    coll.insert_one({"_id": 1, "x": 1})
    rec = Recorder()
    bus = make_bus(coll, full_document=me.FullDocument.UPDATE_LOOKUP, max_updated_fields_size=64)
    bus.subscribe(lambda ev, d: rec.add(d.update_description))
    bus.start()
    coll.update_one({"_id": 1}, {"$set": {"small": 1}})
    coll.update_one({"_id": 1}, {"$set": {"big": "x" * 200}, "$unset": {"x": ""}})
    small, big = rec.wait(2)
    assert small.updated_fields == {"small": 1} and not small.updated_fields_dropped
    assert big.updated_fields == {} and big.updated_fields_dropped
    assert big.removed_fields == ("x",)


def test_current_delivery_is_set_inside_callbacks(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    rec = Recorder()
    bus = make_bus(client.shop.orders)

    @bus.subscribe(name="probe")
    def probe(event: me.ChangeEvent) -> None:
        d = me.current_delivery()  # built on demand: a one-argument callback without middleware
        rec.add(
            (
                d.subscription if d else None,
                d.event.id if d else None,
                event.id,
                d.attempt if d else None,
                me.current_delivery() is d,
            )
        )

    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    name, delivered_id, event_id, attempt, same = rec.wait(1)[0]
    assert name == "probe" and delivered_id == event_id and attempt == 1
    assert same  # asking twice gives the same Delivery
    assert me.current_delivery() is None


# -- 2. ordering ----------------------------------------------------------------------


def test_slow_document_keeps_its_order_while_others_proceed(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    coll = client.shop.orders
    release = threading.Event()
    rec = Recorder()
    bus = make_bus(coll, max_workers=8)

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        key = ev.document_key["_id"]  # type: ignore[index]
        n = ev.full_document["n"] if ev.full_document else None
        if key == "slow" and n == 0:
            assert release.wait(10)
        rec.add((key, n))

    bus.start()
    coll.insert_one({"_id": "slow", "n": 0})
    for i in range(1, 4):
        coll.replace_one({"_id": "slow"}, {"n": i})
    coll.insert_many([{"_id": f"fast{i}", "n": i} for i in range(20)])
    got = rec.wait(20)
    assert all(k.startswith("fast") for k, _ in got)  # others ran while "slow" blocked
    release.set()
    got = rec.wait(24)
    assert [n for k, n in got if k == "slow"] == [0, 1, 2, 3]


@pytest.mark.parametrize("level", ["collection", "database"])
def test_look_alike_document_keys_get_lanes_of_their_own(
    client: pymongo.MongoClient[Any], make_bus: Any, level: str
) -> None:
    """Lanes name the document exactly: ``"1"``, ``1.5``, an ObjectId, a sub-document and
    the same ``_id`` in another collection are other documents, so they must not wait
    behind a slow ``_id: 1`` (whose own later events must). (``True``, which Python finds
    equal to 1, is checked in test_a_bool_id_is_not_the_int_id: the fake cannot store both.)"""
    db = client.shop
    release = threading.Event()
    rec = Recorder()
    bus = make_bus(db.orders if level == "collection" else db, max_workers=8)

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        key = (ev.collection, repr(ev.document_key["_id"]))  # type: ignore[index]
        n = ev.full_document["n"] if ev.full_document else None
        if key == ("orders", "1") and n == 0:
            assert release.wait(10)
        rec.add((key, n))

    bus.start()
    db.orders.insert_one({"_id": 1, "n": 0})
    db.orders.replace_one({"_id": 1}, {"n": 1})
    others: list[Any] = ["1", 1.5, ObjectId(), {"id": 1}]
    for i, key in enumerate(others):
        db.orders.insert_one({"_id": key, "n": 10 + i})
    expected = {("orders", repr(k)) for k in others}
    if level == "database":
        db.invoices.insert_one({"_id": 1, "n": 20})
        expected.add(("invoices", "1"))
    got = rec.wait(len(expected))
    assert {k for k, _ in got} == expected  # all ran while _id 1 was held
    release.set()
    got = rec.wait(len(expected) + 2)
    assert [n for k, n in got if k == ("orders", "1")] == [0, 1]


def test_a_bool_id_is_not_the_int_id() -> None:
    from mongo_events.consumer import _document_lane

    ev = me.ChangeEvent.from_raw(
        {"_id": {"_data": "00"}, "operationType": "insert", "ns": {"db": "d", "coll": "c"}}
    )
    for one_namespace in (True, False):
        lanes = {_document_lane({"_id": k}, ev, one_namespace) for k in (1, True, 1.5, "1")}
        assert len(lanes) == 4  # a set: lanes that compare equal would merge


def test_ordering_none_runs_one_document_in_parallel(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    coll = client.shop.orders
    barrier = threading.Barrier(3, timeout=10)
    rec = Recorder()
    bus = make_bus(coll, max_workers=4, ordering="none")

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        barrier.wait()  # three events of one document must be in the callback at once
        rec.add(ev.id)

    bus.start()
    coll.insert_one({"_id": 1, "n": 0})
    coll.update_one({"_id": 1}, {"$set": {"n": 1}})
    coll.update_one({"_id": 1}, {"$set": {"n": 2}})
    assert len(rec.wait(3)) == 3


def _spy_on_received(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """Records each change's operationType as the watcher receives it (before admission)."""
    from mongo_events.consumer import StreamConsumer

    received = Recorder()
    on_event = StreamConsumer.on_event

    def spy(consumer: StreamConsumer, raw: Any) -> bool:
        received.add(raw.get("operationType"))
        return on_event(consumer, raw)

    monkeypatch.setattr(StreamConsumer, "on_event", spy)
    return received


def test_a_namespace_wide_event_waits_for_earlier_events_and_holds_later_ones(
    client: pymongo.MongoClient[Any], make_bus: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under per-document order a drop has no document lane: it must still run after every
    earlier event (a handler clearing a cache must not be overtaken by an earlier insert
    re-filling it) and before any later one."""
    coll = client.shop.orders
    gate = threading.Event()
    started, log = Recorder(), Recorder()
    bus = make_bus(coll, max_workers=4)
    received = _spy_on_received(monkeypatch)

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        if ev.operation_type is me.OperationType.INSERT and ev.document_id in (1, 2):
            started.add(ev.document_id)
            assert gate.wait(10)
        log.add((str(ev.operation_type), ev.document_id))

    bus.start()
    coll.insert_many([{"_id": 1}, {"_id": 2}])
    assert sorted(started.wait(2)) == [1, 2]  # two workers in slow callbacks, two free
    coll.drop()
    received.wait_until(lambda ops: "drop" in ops)
    # Two workers are free, yet the drop does not run while the earlier inserts do.
    assert not wait_for(lambda: len(log) > 0, timeout=0.5)
    coll.insert_one({"_id": 3})
    gate.set()
    got = log.wait_until(lambda items: ("insert", 3) in items)
    drop = got.index(("drop", None))
    assert {got[0], got[1]} == {("insert", 1), ("insert", 2)} and drop == 2
    assert got.index(("insert", 3)) > drop
    assert bus.join(5)


def test_stop_while_a_namespace_wide_event_waits_leaves_it_undelivered(
    client: pymongo.MongoClient[Any], make_bus: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    coll = client.shop.orders
    gate = threading.Event()
    tokens = me.MemoryResumeTokenStore()
    log = Recorder()
    bus = make_bus(coll, max_workers=2, resume_token_store=tokens)
    received = _spy_on_received(monkeypatch)

    running = threading.Event()

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        if ev.operation_type is me.OperationType.INSERT:
            running.set()
            assert gate.wait(10)
        log.add(str(ev.operation_type))

    bus.start()
    coll.insert_one({"_id": 1})
    coll.drop()
    received.wait_until(lambda ops: "drop" in ops)
    assert running.wait(5)  # the insert is in its callback (a queued one would not start after stop)
    stopper = threading.Thread(target=bus.stop, kwargs={"timeout": 10})
    stopper.start()
    assert bus._consumer.watcher is not None and bus._consumer.watcher.join(5)  # the watcher left the barrier
    gate.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert log.items == ["insert"]  # the drop was never admitted: a restart delivers it
    restarted = make_bus(coll, resume_token_store=tokens)
    again = Recorder()
    restarted.subscribe(lambda ev: again.add(str(ev.operation_type)))
    restarted.start()
    assert again.wait(1)[0] == "drop"


# -- 3., 4., 5. checkpoints and the window ------------------------------------------------


def test_checkpoint_never_passes_an_unfinished_event(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    coll = client.shop.orders
    release = threading.Event()
    rec = Recorder()
    store = me.MemoryResumeTokenStore()
    bus = make_bus(coll, resume_token_store=store, max_workers=8, max_in_flight=500)

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        if ev.document_key == {"_id": 1}:
            assert release.wait(10)
        rec.add(ev)

    bus.start()
    bus.flush()
    before = store.load(bus.resume_token_key)
    coll.insert_many([{"_id": i} for i in range(1, 101)])
    got = rec.wait(99)
    assert {e.document_key["_id"] for e in got} == set(range(2, 101))
    bus.flush()
    after = store.load(bus.resume_token_key)
    assert after == before or (after is not None and before is not None and after.token == before.token)
    first = None
    release.set()
    got = rec.wait(100)
    first = next(e for e in got if e.document_key == {"_id": 1})
    assert bus.join(5)
    bus.flush()
    final = store.load(bus.resume_token_key)
    last = next(e for e in got if e.document_key == {"_id": 100})
    assert final is not None
    assert parse_token(final.token)[0] >= last.cluster_time > first.cluster_time
    assert final.cluster_time == last.cluster_time


def test_filtered_stream_still_advances_its_stored_token(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    coll = client.shop.orders
    store = me.MemoryResumeTokenStore()
    bus = make_bus(coll, resume_token_store=store, pipeline=[{"$match": {"operationType": "delete"}}])
    bus.subscribe(lambda ev: pytest.fail("nothing should match"))
    bus.start()
    coll.insert_many([{"_id": i} for i in range(5)])
    last_write = client.shop.command("ping")["operationTime"]

    def caught_up() -> bool:
        bus.flush()
        cp = store.load(bus.resume_token_key)
        return cp is not None and parse_token(cp.token)[0] >= last_write

    from .conftest import wait_for

    bus.stop()  # the final flush writes the idle token even within the idle interval
    assert caught_up() or wait_for(caught_up, 5)


def test_a_small_window_freed_only_by_checkpoint_writes_delivers_everything_in_order(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    """Batched hand-off under a full window: the watcher collects work per batch and
    waits for room that only a checkpoint write frees (the timed flush is far away)."""
    coll = client.shop.orders
    rec = Recorder()
    store = me.MemoryResumeTokenStore()
    bus = make_bus(
        coll, resume_token_store=store, max_workers=4, max_in_flight=20, batch_size=500, flush_interval=60
    )
    bus.subscribe(lambda ev: rec.add((ev.document_key["_id"], ev.operation_type)))
    bus.start()
    coll.insert_many([{"_id": i, "n": 0} for i in range(300)])
    coll.update_many({}, {"$set": {"n": 1}})
    got = rec.wait(600, timeout=60)
    assert sorted(got) == sorted(
        [(i, me.OperationType.INSERT) for i in range(300)]
        + [(i, me.OperationType.UPDATE) for i in range(300)]
    )
    for i in range(300):  # per-document order held
        assert got.index((i, me.OperationType.INSERT)) < got.index((i, me.OperationType.UPDATE))
    assert bus.join(10)
    assert bus.token_writes >= 600 // 20 - 1  # the window (20) was freed by writes, not by the 60 s timer


def test_an_event_finished_while_the_lock_was_busy_still_frees_its_lane(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    """A worker reports without waiting for the lock; if the lock is busy and the worker
    then sits in a slow callback, the finished event must still be reported (by an idle
    worker or the watcher), or the next event of its document would wait for the slow one."""
    coll = client.shop.orders
    held = threading.Event()
    release = threading.Event()
    slow_started = threading.Event()
    rec = Recorder()
    bus = make_bus(coll, max_workers=2, max_await_time=1.0)

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        key = ev.document_key["_id"]  # type: ignore[index]
        if key == "slow":
            slow_started.set()
            assert release.wait(10)
        elif ev.operation_type is me.OperationType.INSERT:
            assert held.wait(10)  # return only while the test holds the bus's lock
        rec.add((key, str(ev.operation_type)))

    bus.start()
    coll.insert_one({"_id": "x"})
    coll.insert_one({"_id": "slow"})
    coll.update_one({"_id": "x"}, {"$set": {"n": 1}})
    assert wait_for(lambda: bus.in_flight == 3, 5)  # all three admitted, x's update in its lane
    with bus._consumer.window.mutex:
        held.set()
        assert wait_for(lambda: len(bus._dispatcher.finished) == 1, 5)  # x finished, unreported
    assert slow_started.wait(5)
    got = rec.wait(2)  # x's update ran although one worker is stuck in the slow callback
    assert got == [("x", "insert"), ("x", "update")]
    release.set()
    assert rec.wait(3)[-1] == ("slow", "insert")


def test_finished_events_are_reported_while_every_worker_sits_in_a_slow_callback(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    """A worker with more work queued defers reporting what it finished (it reports in
    runs). If it then blocks in a slow callback, as every other worker does, the watcher
    or the flusher must report the finished event: the checkpoint still reaches it."""
    coll = client.shop.orders
    gate = threading.Event()
    release = threading.Event()
    tokens = me.MemoryResumeTokenStore()
    rec = Recorder()
    bus = make_bus(coll, max_workers=2, resume_token_store=tokens)

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        key = ev.document_key["_id"]  # type: ignore[index]
        if key == "x":
            assert gate.wait(10)
            rec.add(ev.resume_token)
        else:
            assert release.wait(10)

    bus.start()
    coll.insert_one({"_id": "x"})  # worker 1 holds it until the gate opens
    coll.insert_one({"_id": "slow-1"})  # worker 2 blocks in it
    coll.insert_one({"_id": "slow-2"})  # queued: worker 1 takes it after x
    assert wait_for(lambda: bus.in_flight == 3 and bus._dispatcher._ready.qsize() == 1, 5)
    gate.set()  # x finishes with slow-2 queued: worker 1 defers its report and blocks in slow-2
    x_token = rec.wait(1)[0]
    assert wait_for(lambda: bus._dispatcher._ready.qsize() == 0, 5)  # both workers blocked now
    assert wait_for(lambda: (cp := tokens.load(bus.resume_token_key)) is not None and cp.token == x_token, 5)
    release.set()
    assert bus.join(5)


def test_max_in_flight_bounds_the_window_behind_a_blocked_event(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    coll = client.shop.orders
    release = threading.Event()
    rec = Recorder()
    bus = make_bus(coll, max_in_flight=50, max_workers=4, batch_size=500)
    peak = [0]

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        if ev.document_key == {"_id": 0}:
            assert release.wait(20)
        peak[0] = max(peak[0], bus.in_flight)
        rec.add(1)

    bus.start()
    total = 10_000  # 200 windows of 50: enough to catch a bound that leaks, in a tenth of the time
    coll.insert_many([{"_id": i} for i in range(total)])
    rec.wait(49)  # everything the window admits behind the blocked event finishes
    assert bus.in_flight == 50
    assert len(rec) == 49  # and no more are admitted while event 0 holds the window shut
    release.set()
    rec.wait(total, timeout=120)
    assert peak[0] <= 50
    assert bus.join(10)


# -- 6. restart redelivers exactly what was unfinished ---------------------------------------


def test_stop_with_events_in_flight_then_restart_redelivers_only_unfinished(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    coll = client.shop.orders
    store = me.MemoryResumeTokenStore()
    gate = threading.Event()
    first = Recorder()
    bus = make_bus(coll, resume_token_store=store, max_workers=2)

    @bus.subscribe(name="h")
    def handle(ev: me.ChangeEvent) -> None:
        if ev.document_key["_id"] >= 5:  # type: ignore[index]
            gate.wait(0.5)  # still running when stop() gives up on it
        first.add(ev.document_key["_id"])  # type: ignore[index]

    bus.start()
    coll.insert_many([{"_id": i} for i in range(10)])
    first.wait(5)
    with pytest.raises(me.ShutdownTimeout):
        bus.stop(timeout=0.1)
    gate.set()
    done_before = set(first.items)

    second = Recorder()
    bus2 = make_bus(coll, resume_token_store=store)
    bus2.subscribe(lambda ev: second.add(ev.document_key["_id"]), name="h")
    bus2.start()
    coll.insert_one({"_id": 100})
    second.wait_until(lambda items: 100 in items)
    assert bus2.join(10)  # 100 may finish before earlier events on other workers
    redelivered = set(second.items) - {100}
    assert set(range(10)) - done_before <= redelivered  # every unfinished event came again
    assert not redelivered & set(range(5))  # nothing at or before the checkpoint did


def test_join_says_false_when_a_stop_leaves_events_undone(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    # join() gave up when another thread stopped the bus, and said True ("every event done")
    # although the running callback's event and the queued one were left for the next start.
    coll = client.shop.orders
    entered, release = threading.Event(), threading.Event()
    bus = make_bus(coll, max_workers=1)

    @bus.subscribe(name="h")
    def handle(ev: me.ChangeEvent) -> None:
        entered.set()
        assert release.wait(10)

    bus.start()
    joined: list[bool] = []
    try:
        coll.insert_many([{"_id": 1}, {"_id": 2}])
        assert entered.wait(5)
        joiner = threading.Thread(target=lambda: joined.append(bus.join(30)))
        joiner.start()
        with pytest.raises(me.ShutdownTimeout):
            bus.stop(timeout=0.1)
        joiner.join(10)
        assert not joiner.is_alive()
    finally:
        release.set()
    assert joined == [False]
    assert bus.join(5) is False  # and so does a join after the stop


# -- 7. resume options -------------------------------------------------------------------------


def test_start_from_past_replays_history_only_without_a_token(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    coll = client.shop.orders
    coll.insert_one({"_id": "old"})
    store = me.MemoryResumeTokenStore()
    rec = Recorder()
    bus = make_bus(coll, resume_token_store=store, start_from_past=timedelta(minutes=5))
    bus.subscribe(lambda ev: rec.add(ev.document_key["_id"]))
    bus.start()
    assert rec.wait(1) == ["old"]
    bus.stop()
    again = Recorder()
    bus2 = make_bus(coll, resume_token_store=store, start_from_past=timedelta(minutes=5))
    bus2.subscribe(lambda ev: again.add(ev.document_key["_id"]))
    bus2.start()
    coll.insert_one({"_id": "new"})
    assert again.wait(1) == ["new"]


def test_resume_false_starts_from_now_and_reset_clears_the_token(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    coll = client.shop.orders
    rec = Recorder()
    bus = make_bus(coll, resume=False)
    bus.subscribe(lambda ev: rec.add(ev.document_key["_id"]))
    assert bus.token_store is None
    bus.start()
    bus.stop()
    coll.insert_one({"_id": "missed"})
    bus.start()
    coll.insert_one({"_id": "seen"})
    assert rec.wait(1) == ["seen"]
    bus.stop()

    resumable = make_bus(coll, resume_token_id="worker-1")
    resumable.subscribe(lambda ev: None)
    assert resumable.resume_token_key == "shop.orders:worker-1"
    resumable.start()
    with pytest.raises(me.BusStateError):
        resumable.reset_resume_token()
    resumable.stop()
    assert client.shop["_event_resume_tokens"].find_one({"_id": "shop.orders:worker-1"}) is not None
    resumable.reset_resume_token()
    assert client.shop["_event_resume_tokens"].find_one({"_id": "shop.orders:worker-1"}) is None


def test_resume_token_collection_option(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    internal = client.internal["_resume_tokens"]
    bus = make_bus(client.shop.orders, resume_token_collection=internal, resume_token_id="w")
    bus.subscribe(lambda ev: None)
    bus.start()
    bus.stop()
    assert internal.find_one({"_id": "shop.orders:w"}) is not None
    named = make_bus(client.shop.orders, resume_token_collection="tokens", resume_token_id="w")
    named.subscribe(lambda ev: None)
    named.start()
    named.stop()
    assert client.shop.tokens.find_one({"_id": "shop.orders:w"}) is not None


# -- 8. batched token writes -------------------------------------------------------------------


def _token_writes_for_10_000_inserts(
    fake_rs: FakeReplicaSet,
    client: pymongo.MongoClient[Any],
    make_bus: Any,
    n: int = 10_000,
    work_s: float = 0.0,
    **options: Any,
) -> tuple[int, float]:
    """Token writes a bus made for ``n`` inserts (after start()'s opening write), and the seconds
    from the inserts to its stop; the fake's update count must agree with the bus's. Each callback
    does ``work_s`` seconds of work (a slow handler)."""
    coll = client.shop.orders
    rec = Recorder()
    bus = make_bus(coll, batch_size=1000, **options)

    def handler(ev: Any) -> None:
        if work_s:
            time.sleep(work_s)  # the handler's own work, not synchronisation
        rec.add(1)

    bus.subscribe(handler)
    bus.start()
    fake_rs.reset_counters()
    writes_before = bus.token_writes  # the opening position, written by start()
    began = time.monotonic()
    coll.insert_many([{"_id": i} for i in range(n)])
    rec.wait(n, timeout=120)
    assert bus.join(10)
    bus.stop()
    writes = bus.token_writes - writes_before
    assert fake_rs.command_count("update") == writes
    return writes, time.monotonic() - began


def test_token_writes_are_batched_by_the_flush_interval(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    # The window never fills here, so only the flusher's ticks (at most one per interval) and the
    # final write at stop can write: the bound comes from the elapsed time, not from a speed guess.
    writes, elapsed = _token_writes_for_10_000_inserts(
        fake_rs, client, make_bus, flush_interval=0.5, max_in_flight=20_000
    )
    assert 1 <= writes <= elapsed / 0.5 + 2
    assert writes < 1000  # batched: nowhere near one write per event


def test_a_full_window_writes_about_once_per_window(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    # No flusher ticks during the test: every write is one the full window asked for. Each frees at
    # most the window (1000) and is asked for only when it frees at least three quarters of it
    # (750: the watcher waits for that much room), and not again while it is writing; +2 for the
    # opening write and a partial last window.
    writes, _ = _token_writes_for_10_000_inserts(
        fake_rs, client, make_bus, flush_interval=3600, max_in_flight=1000
    )
    assert 9 <= writes <= 10_000 // 750 + 2


def test_a_full_window_with_a_slow_handler_writes_about_once_per_window(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    # The same structural bound with a slow handler, where finished events trickle in at the head
    # while the window is full of queued ones: the flusher is still asked only once the unwritten
    # finished head reaches three quarters of the window (750), so each write frees that much.
    # (Before, it was asked at 256 and woken again during its own write: about 16 writes here.)
    writes, _ = _token_writes_for_10_000_inserts(
        fake_rs,
        client,
        make_bus,
        n=4000,
        work_s=0.0005,
        flush_interval=3600,
        max_in_flight=1000,
        max_workers=8,
    )
    assert 3 <= writes <= 4000 // 750 + 2


# -- configuration and lifecycle errors ------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"full_document_only": True}, "full_document_only needs"),
        ({"max_updated_fields_size": 10}, "max_updated_fields_size drops"),
        ({"max_updated_fields_size": 10, "full_document_only": True}, "max_updated_fields_size drops"),
        ({"ordering": "random"}, "ordering must be"),
        ({"max_in_flight": 0}, "at least 1"),
        ({"resume": False, "resume_token_store": me.MemoryResumeTokenStore()}, "resume=False"),
        ({"start_from_past": timedelta(0)}, "positive"),
        ({"pipeline": [{"$match": {}, "$project": {}}]}, "one-key mapping"),
        ({"on_history_lost": "ignore"}, "on_history_lost"),
    ],
)
def test_invalid_options_raise_configuration_error(
    client: pymongo.MongoClient[Any], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(me.ConfigurationError, match=message):
        me.Bus(client.shop.orders, **options)


def test_bus_needs_a_watchable_target() -> None:
    with pytest.raises(me.ConfigurationError, match="Collection, Database or MongoClient"):
        me.Bus("shop.orders")  # type: ignore[arg-type]


def test_lifecycle_errors(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    bus = make_bus(client.shop.orders)
    with pytest.raises(me.ConfigurationError, match="no subscriptions"):
        bus.start()
    bus.subscribe(lambda ev: None, name="a")
    with pytest.raises(me.ConfigurationError, match="already exists"):
        bus.subscribe(lambda ev: None, name="a")
    with pytest.raises(me.ConfigurationError, match="too many parameters"):
        bus.subscribe(lambda a, b, c: None, name="b")
    bus.start()
    with pytest.raises(me.BusStateError):
        bus.start()
    with pytest.raises(me.BusStateError):
        bus.subscribe(lambda ev: None, name="late")
    bus.stop()
    assert bus.state is me.BusState.STOPPED
    bus.stop()  # stopping twice is fine


def test_start_fails_fast_on_a_standalone_server() -> None:
    with FakeReplicaSet(standalone=True) as rs:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        bus = me.Bus(client.shop.orders, resume=False, **FAST)
        bus.subscribe(lambda ev: None)
        with pytest.raises(me.ConfigurationError, match="replica set"):
            bus.start()
        assert bus.state is me.BusState.FAILED
        client.close()


def test_a_failure_between_the_stream_opening_and_running_makes_start_raise(
    client: pymongo.MongoClient[Any], make_bus: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    # A failure after the run started its streams but before start() said RUNNING used to be
    # overwritten: the bus said RUNNING and "started" while its stopper thread shut it down.
    from mongo_events import run as run_module

    bus = make_bus(client.shop.orders)
    bus.subscribe(lambda ev: None)
    broken = me.ConfigurationError("broken just after the stream opened")
    original = run_module.BusRun.start

    def start_then_fail(self: Any) -> None:
        original(self)
        bus._fail(broken)

    monkeypatch.setattr(run_module.BusRun, "start", start_then_fail)
    with caplog.at_level(logging.INFO, logger="mongo_events"), pytest.raises(me.ConfigurationError) as info:
        bus.start()
    assert info.value is broken and bus.error is broken
    assert bus.state is me.BusState.FAILED
    assert not [r for r in caplog.records if "started: watching" in r.getMessage()]


def test_context_manager_and_object_ids(client: pymongo.MongoClient[Any]) -> None:
    rec = Recorder()
    bus = me.Bus(client.shop.orders, **FAST)
    bus.subscribe(rec.add)
    oid = ObjectId()
    with bus:
        client.shop.orders.insert_one({"_id": oid})
        (ev,) = rec.wait(1)
    assert ev.document_id == oid and bus.state is me.BusState.STOPPED


def test_a_script_that_never_stops_its_bus_still_exits() -> None:
    """concurrent.futures joins worker threads at exit: running workers must be halted first."""
    import subprocess
    import sys

    code = (
        "import pymongo, mongo_events as me\n"
        "from mongo_events.testing import FakeReplicaSet\n"
        "rs = FakeReplicaSet().start()\n"
        "bus = me.Bus(pymongo.MongoClient(rs.uri).shop.orders, max_await_time=0.05)\n"
        "bus.subscribe(lambda ev: None)\n"
        "bus.start()\n"
        "print(bus.state.value)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "running"


def test_full_document_only_says_when_an_update_lost_its_document(
    client: pymongo.MongoClient[Any], make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """updateLookup returns null for a document deleted before the lookup: logged and counted, never silent."""
    coll = client.shop.users
    rec = Recorder()
    bus = make_bus(
        coll, full_document=me.FullDocument.UPDATE_LOOKUP, full_document_only=True, ordering="stream"
    )
    bus.subscribe(lambda doc: rec.add(doc))
    coll.insert_one({"_id": 1, "name": "a"})
    coll.update_one({"_id": 1}, {"$set": {"name": "b"}})
    coll.delete_one({"_id": 1})  # before the bus starts: the update's lookup finds nothing
    bus.start_from_past = timedelta(minutes=5)
    bus.start()
    got = rec.wait(2)
    assert bus.join(5)
    assert got == [{"_id": 1, "name": "a"}, {"_id": 1}]  # the insert and the delete's key
    assert bus.missing_documents == 1
    assert "has no full document" in caplog.text


def test_the_private_pymongo_attributes_the_watcher_reads_still_exist(
    client: pymongo.MongoClient[Any], fake_rs: FakeReplicaSet
) -> None:
    """The watcher reads ``ChangeStream._resume_token`` (the public property deep-copies per
    event) and ``CommandCursor._data`` (what pymongo holds without I/O). A pymongo that
    renames them only sends the watcher down its slower fallbacks, so nothing else would
    notice: this test fails instead, on every interpreter and pymongo of the tox matrix."""
    from mongo_events.watcher import pymongo_peek  # the one adapter that reads them

    read_token, read_buffered = pymongo_peek()
    coll = client.shop.orders
    with coll.watch(max_await_time_ms=50) as stream:
        coll.insert_many([{"_id": i} for i in range(3)])
        first = None
        while first is None:
            first = stream.try_next()
        assert read_token(stream) == stream.resume_token == first["_id"]
        buffered = read_buffered(stream)
        assert isinstance(buffered, collections.deque)
        assert len(buffered) == 2  # the getMore brought all three inserts
        get_mores = fake_rs.command_count("getMore")
        rest = [stream.try_next() for _ in range(len(buffered))]
        assert all(raw is not None for raw in rest) and not read_buffered(stream)
        assert fake_rs.command_count("getMore") == get_mores  # what it held came without I/O


class _AggregateListener(monitoring.CommandListener):
    def __init__(self) -> None:
        self.cursor_options: list[Any] = []
        self.seen = threading.Event()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "aggregate":
            self.cursor_options.append(event.command.get("cursor"))
            self.seen.set()

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_the_stream_asks_for_batches_of_1000_by_default(fake_rs: FakeReplicaSet, make_bus: Any) -> None:
    # The default batch size bounds what pymongo holds decoded outside the window (README: the
    # batch size); without it the server fills batches up to 16 MiB.
    listener = _AggregateListener()
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(
        fake_rs.uri, event_listeners=[listener], **CLIENT_OPTIONS
    )
    try:
        bus = make_bus(client.shop.orders)
        bus.subscribe(lambda ev: None)
        bus.start()
        assert listener.seen.wait(10)
        bus.stop()
        assert listener.cursor_options[0] == {"batchSize": 1000}
    finally:
        client.close()


# -- change documents read as raw BSON (a RawBSONDocument collection) ----------------------


def test_a_raw_bson_collection_delivers_the_same_events_and_never_decodes_filtered_documents(
    client: pymongo.MongoClient[Any], make_bus: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Watching a collection whose ``document_class`` is ``RawBSONDocument``, events decode a
    field when it is read: an event every subscription filters out never decodes its full
    document, and what a callback reads equals what a plain collection's bus delivers."""
    from bson.raw_bson import RawBSONDocument

    from mongo_events import events

    decoded_documents: list[Any] = []
    inner = events.decoded

    def counting(value: Any, options: Any) -> Any:
        out = inner(value, options)
        if isinstance(value, RawBSONDocument) and "sku" in out:  # only full documents carry "sku"
            decoded_documents.append(out)
        return out

    monkeypatch.setattr(events, "decoded", counting)
    plain = client.shop.orders
    raw = plain.with_options(codec_options=plain.codec_options.with_options(document_class=RawBSONDocument))
    tokens = me.MemoryResumeTokenStore()
    updates, every = Recorder(), Recorder()
    lazy_bus = make_bus(raw, update_description=True, resume_token_store=tokens)
    lazy_bus.subscribe(operations={"update"})(lambda ev, d: updates.add((ev, d)))
    plain_bus = make_bus(plain, update_description=True, resume_token_id="plain")
    plain_bus.subscribe(every.add)
    lazy_bus.start()
    plain_bus.start()
    plain.insert_many([{"_id": i, "sku": f"s{i}", "qty": i} for i in range(20)])
    plain.update_one({"_id": 3}, {"$set": {"qty": 30}})
    ((event, delivery),) = updates.wait(1)
    # Eight workers finish different documents in any order: find the update, not the last one.
    (same,) = [ev for ev in every.wait(21) if ev.operation_type == "update"]
    assert same == event and same.to_dict() == event.to_dict()
    assert event.update_description == same.update_description
    assert delivery.update_description is not None and delivery.update_description.updated_fields == {
        "qty": 30
    }
    assert type(event.resume_token) is dict and type(event.document_key) is dict
    assert lazy_bus.join(5)
    assert decoded_documents == []  # 20 inserts filtered out: not one full document decoded
    lazy_bus.stop()
    checkpoint = tokens.load(lazy_bus.resume_token_key)
    assert checkpoint is not None and type(checkpoint.token) is dict  # stores never see raw BSON
    assert isinstance(checkpoint.token.get("_data"), str)
