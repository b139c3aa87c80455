"""The initial snapshot (issue 21): existing documents, then the stream, resumable mid-way."""

from __future__ import annotations

import threading
from typing import Any

import pymongo
import pytest

import mongo_events as me
from mongo_events.snapshot import parse_progress

from .helpers import Recorder


def _orders(client: pymongo.MongoClient[Any], n: int) -> None:
    client.shop.orders.insert_many([{"_id": i, "v": 0} for i in range(n)])


def test_a_snapshot_of_10000_documents_then_changes_in_per_document_order(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    _orders(client, 10_000)
    store = me.MemoryResumeTokenStore()
    rec = Recorder()
    bus = make_bus(
        client.shop.orders,
        ordering="stream",  # the assertions below read cross-document order
        resume_token_store=store,
        snapshot="initial",
        snapshot_batch_size=700,
        max_in_flight=500,
        full_document=me.FullDocument.UPDATE_LOOKUP,
    )
    bus.subscribe(
        lambda ev: rec.add((str(ev.operation_type), ev.document_id, (ev.full_document or {}).get("v")))
    )
    bus.start()
    # Changes during and after the scan: each document's snapshot event comes before them.
    for i in range(0, 10_000, 1000):
        client.shop.orders.update_one({"_id": i}, {"$set": {"v": 1}})
    client.shop.orders.insert_one({"_id": 10_000, "v": 0})
    got = rec.wait_until(lambda items: ("insert", 10_000, 0) in items, timeout=60)
    snap = [doc for op, doc, _ in got if op == "snapshot"]
    # Every document once; the one inserted during the scan may be read by it too (then again as an insert).
    assert sorted(d for d in snap if d != 10_000) == list(range(10_000)) and snap.count(10_000) <= 1
    for i in range(0, 10_000, 1000):
        ops = [op for op, doc, _ in got if doc == i]
        assert ops == ["snapshot", "update"], ops[:5]
    assert bus.health().phase == "streaming" and bus.health().snapshot_read in (10_000, 10_001)
    bus.stop()
    checkpoint = store.load(bus.resume_token_key)
    assert checkpoint is not None and parse_progress(checkpoint.token) is None  # it ends at the stream


def test_snapshot_initial_only_without_a_checkpoint_and_always_every_time(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    _orders(client, 5)
    store = me.MemoryResumeTokenStore()

    def run(mode: str | None) -> list[Any]:
        rec = Recorder()
        bus = make_bus(client.shop.orders, ordering="stream", resume_token_store=store, snapshot=mode)
        bus.subscribe(lambda ev: rec.add((str(ev.operation_type), ev.document_id)))
        bus.start()
        marker = f"marker-{id(bus)}"
        client.shop.orders.insert_one({"_id": marker})
        got = rec.wait_until(lambda items: ("insert", marker) in items)
        bus.stop()
        client.shop.orders.delete_one({"_id": marker})
        return [doc for op, doc in got if op == "snapshot" and doc != marker]  # the scan may see it

    assert run("initial") == [0, 1, 2, 3, 4]
    assert run("initial") == []  # a checkpoint exists: stream only
    assert run("always") == [0, 1, 2, 3, 4]
    bus = make_bus(client.shop.orders, ordering="stream", resume_token_store=store)
    bus.snapshot()
    assert run(None) == [0, 1, 2, 3, 4]  # Bus.snapshot() forces one at the next start


def test_an_interrupted_snapshot_continues_after_the_last_finished_id(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    _orders(client, 300)
    store = me.MemoryResumeTokenStore()
    release = threading.Event()
    seen = Recorder()

    def slow(ev: me.ChangeEvent) -> None:
        seen.add(ev.document_id)
        if ev.document_id == 150:
            release.wait(10)  # holds the window at 150: the checkpoint stays below it

    first = make_bus(
        client.shop.orders,
        ordering="stream",  # the assertions below read cross-document order
        resume_token_store=store,
        snapshot="initial",
        snapshot_batch_size=50,
        max_in_flight=40,
        max_workers=1,
    )
    first.subscribe(slow)
    first.start()
    seen.wait_until(lambda items: 150 in items)
    first.flush()
    checkpoint = store.load(first.resume_token_key)
    assert checkpoint is not None
    progress = parse_progress(checkpoint.token)
    assert progress is not None and progress.has_after and 100 <= progress.after < 150
    release.set()
    first.stop()
    done = parse_progress(store.load(first.resume_token_key).token)  # type: ignore[union-attr]
    after = done.after if done is not None else None
    rec = Recorder()
    second = make_bus(client.shop.orders, ordering="stream", resume_token_store=store, snapshot="initial")
    second.subscribe(lambda ev: rec.add(ev.document_id))
    second.start()
    client.shop.orders.insert_one({"_id": "end"})
    got = rec.wait_until(lambda items: "end" in items)
    snap = [d for d in got if d != "end"]
    if done is None:  # the first bus finished the scan before it stopped
        assert snap == []
    else:
        assert snap == list(range(after + 1, 300))  # not from the first _id
    assert set(seen.items) | set(snap) >= set(range(300))
    assert len(set(seen.items) & set(snap)) <= 40  # redelivered: at most max_in_flight


def test_snapshot_options_are_checked(client: pymongo.MongoClient[Any]) -> None:
    with pytest.raises(me.ConfigurationError, match="snapshot"):
        me.Bus(client.shop.orders, snapshot="sometimes")  # type: ignore[arg-type]
    with pytest.raises(me.ConfigurationError, match="snapshot_collections"):
        me.Bus(client, snapshot="initial")
    with pytest.raises(me.ConfigurationError, match="snapshot_batch_size"):
        me.Bus(client.shop.orders, snapshot="initial", snapshot_batch_size=0)


def test_a_snapshot_of_a_raw_bson_collection_delivers_plain_documents(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    from bson.raw_bson import RawBSONDocument

    _orders(client, 5)
    orders = client.shop.orders
    raw = orders.with_options(codec_options=orders.codec_options.with_options(document_class=RawBSONDocument))
    rec = Recorder()
    bus = make_bus(raw, snapshot="initial", resume_token_store=me.MemoryResumeTokenStore())
    bus.subscribe(rec.add)
    bus.start()
    got = rec.wait(5)
    assert sorted(ev.document_id for ev in got) == list(range(5))
    assert all(
        type(ev.full_document) is dict and ev.full_document == orders.find_one(ev.document_id) for ev in got
    )
