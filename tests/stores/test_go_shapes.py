"""Stored documents in the Go libraries' shapes (``shared/reference/seed-spec.md``).

One test per store: a document exactly as the Go library writes it loads here, and
the document this library writes is compared field by field with the shape Go
decodes (its struct's field names and BSON types; Go ignores extra fields and
reads a missing one as its zero value). Index names are compared too: a same-key
index under another name would make the second library's ``createIndexes`` fail.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from datetime import datetime, timedelta, timezone
from typing import Any

import bson
import pymongo
from bson import Int64, ObjectId
from bson.binary import Binary
from bson.timestamp import Timestamp

import mongo_events as me
from mongo_events.monitor import MongoMonitorStore, MonitorEntry, MonitorStatus

#: Go's zero time.Time, as its driver writes it (BSON date -62135596800000).
GO_ZERO = datetime(1, 1, 1)
T0 = datetime(2026, 3, 4, 5, 6, 7)
STR, DATE, INT, DOC, BIN = (str,), (datetime,), (int,), (dict,), (bytes,)


def _naive(value: Any) -> Any:
    return value.replace(tzinfo=None) if isinstance(value, datetime) else value


def assert_go_shape(
    doc: Mapping[str, Any],
    shape: Mapping[str, tuple[type, ...]],
    *,
    required: AbstractSet[str],
    optional_null: AbstractSet[str] = frozenset(),
) -> None:
    """Each field Go's struct has is present when required, of a type Go decodes into that field."""
    missing = required - set(doc)
    assert not missing, f"fields Go expects are missing: {missing}"
    for field, types in shape.items():
        if field not in doc:
            continue
        value = doc[field]
        if value is None:
            assert field in optional_null, f"{field} is null; Go's field is not a pointer"
            continue
        assert isinstance(value, types) and not isinstance(value, bool), (
            f"{field}={value!r} is {type(value).__name__}, Go reads {types}"
        )


# -- acks (em: MongoAckStore) ------------------------------------------------------------------


ACK_SHAPE = {"_id": STR, "created_at": DATE, "acked_at": DATE}


def test_ack_records(mongo_collection: Callable[[str], Any]) -> None:
    coll = mongo_collection("_event_acks")
    store = me.MongoAckStore(coll, ttl=timedelta(hours=24))
    store.ensure_indexes()
    # Given records written by the Go library: pending (zero time, no omitempty) and acked
    coll.insert_many(
        [
            {"_id": "8264A0000000010000", "created_at": T0, "acked_at": GO_ZERO},
            {
                "_id": "8264A0000000020000",
                "created_at": T0 + timedelta(seconds=1),
                "acked_at": T0 + timedelta(seconds=2),
            },
        ]
    )
    # Then they load here with the same meaning
    pending = store.get("8264A0000000010000")
    assert pending is not None and pending.status is me.AckStatus.PENDING and pending.acked_at is None
    acked = store.get("8264A0000000020000")
    assert (
        acked is not None
        and acked.status is me.AckStatus.ACKED
        and _naive(acked.acked_at) == T0 + timedelta(seconds=2)
    )
    assert store.count(me.AckFilter(status=me.AckStatus.PENDING)) == 1
    assert [r.event_id for r in store.list(me.AckFilter(status=me.AckStatus.PENDING))] == [
        "8264A0000000010000"
    ]
    assert store.count(me.AckFilter(status=me.AckStatus.ACKED)) == 1

    # When this library writes a pending and an acked record
    now = datetime.now(timezone.utc)
    store.write([me.AckRecord("py-pending", now), me.AckRecord("py-acked", now, now)])
    # Then each document has Go's fields and types, pending with Go's zero time
    for event_id in ("py-pending", "py-acked"):
        doc = coll.find_one({"_id": event_id})
        assert set(doc) == {"_id", "created_at", "acked_at"}
        assert_go_shape(doc, ACK_SHAPE, required={"_id", "created_at", "acked_at"})
    assert _naive(coll.find_one({"_id": "py-pending"})["acked_at"]) == GO_ZERO
    # ... which Go's own queries count and its Ack updates
    zero = datetime(1, 1, 1, tzinfo=timezone.utc)
    assert coll.count_documents({"acked_at": {"$eq": zero}}) == 2  # Go's pending filter
    assert coll.count_documents({"acked_at": {"$gt": zero}}) == 2  # Go's acked filter
    go_ack = coll.update_one({"_id": "py-pending", "acked_at": zero}, {"$set": {"acked_at": now}})
    assert go_ack.modified_count == 1
    assert store.get("py-pending").status is me.AckStatus.ACKED  # type: ignore[union-attr]
    # A null acked_at (written by earlier builds of this library) still reads as pending.
    coll.insert_one({"_id": "legacy", "created_at": T0, "acked_at": None})
    assert store.get("legacy").status is me.AckStatus.PENDING  # type: ignore[union-attr]
    # ... and is listed and counted as pending, like Go's zero time (and a missing one too)
    coll.insert_one({"_id": "legacy-missing", "created_at": T0})
    pending = me.AckFilter(status=me.AckStatus.PENDING)
    assert store.count(pending) == 3
    assert {r.event_id for r in store.list(pending)} == {"8264A0000000010000", "legacy", "legacy-missing"}
    assert store.count(me.AckFilter(status=me.AckStatus.ACKED)) == 3
    # And the indexes are Go's: same names, keys and partial filters
    info = coll.index_information()
    assert {"created_at_1", "acked_at_1", "acked_at_pending"} <= set(info)
    assert info["acked_at_1"]["expireAfterSeconds"] == 86400


# -- resume tokens (em: MongoResumeTokenStore) --------------------------------------------------


TOKEN_SHAPE = {"_id": STR, "token": DOC, "updated_at": DATE}


def test_resume_tokens(mongo_collection: Callable[[str], Any]) -> None:
    coll = mongo_collection("_event_resume_tokens")
    store = me.MongoResumeTokenStore(coll)
    store.ensure_indexes()
    # Given a token saved by the Go transport for the collection shop.orders, id host-1
    token = {"_data": "8264A1B2C3000000012B022C0100296E5A1004"}
    coll.insert_one({"_id": "shop.orders:host-1", "token": token, "updated_at": T0})
    # Then a bus with the same target and id finds it under the same key
    client: pymongo.MongoClient[Any] = pymongo.MongoClient("mongodb://127.0.0.1:1", connect=False)
    try:
        assert me.Bus(client.shop.orders, resume_token_id="host-1").resume_token_key == "shop.orders:host-1"
        assert me.Bus(client.shop, resume_token_id="host-1").resume_token_key == "shop.*:host-1"
        assert me.Bus(client, resume_token_id="host-1").resume_token_key == "*.*:host-1"
    finally:
        client.close()
    checkpoint = store.load("shop.orders:host-1")
    assert checkpoint is not None
    assert (
        dict(checkpoint.token) == token
        and checkpoint.cluster_time is None
        and _naive(checkpoint.updated_at) == T0
    )

    # When this library saves one
    store.save("shop.*:host-2", {"_data": "8264A1B2C4000000022B"}, Timestamp(1772600767, 3))
    doc = coll.find_one({"_id": "shop.*:host-2"})
    # Then Go's fields are there with Go's types (cluster_time is extra; Go ignores it)
    assert {"_id", "token", "updated_at"} <= set(doc)
    assert_go_shape(doc, TOKEN_SHAPE, required={"_id", "token", "updated_at"})
    assert doc["token"] == {"_data": "8264A1B2C4000000022B"}
    assert "updated_at_1" in coll.index_information()
    # Go's Save(nil) deletes the document; so does reset here
    store.delete("shop.orders:host-1")
    assert coll.find_one({"_id": "shop.orders:host-1"}) is None


# -- dead letters (event-dlq: MongoStore) ----------------------------------------------------


DLQ_SHAPE = {
    "_id": STR,
    "event_name": STR,
    "original_id": STR,
    "payload": BIN,
    "metadata": DOC,
    "error": STR,
    "retry_count": INT,
    "source": STR,
    "created_at": DATE,
    "retried_at": DATE,
    "quarantined_at": DATE,
}


def test_dead_letters(mongo_collection: Callable[[str], Any]) -> None:
    coll = mongo_collection("event_dlq")
    store = me.MongoDeadLetterStore(coll)
    store.ensure_indexes()
    # Given a letter written by Go's event-dlq: payload is the message bytes (the Go
    # transport's ChangeEvent JSON), metadata strings, retried_at/quarantined_at omitted
    go_payload = {
        "id": "8264A1",
        "operation_type": "insert",
        "database": "shop",
        "collection": "orders",
        "document_key": "7",
    }
    coll.insert_one(
        {
            "_id": "5b0c8f3e-8a51-4c1e-9d41-2f3f0f6d1e11",
            "event_name": "order.changes",
            "original_id": "8264A1",
            "payload": Binary(json.dumps(go_payload).encode()),
            "metadata": {
                "Content-Type": "application/json",
                "operation": "insert",
                "namespace": "shop.orders",
            },
            "error": "Reject: Bad Order",
            "retry_count": 3,
            "source": "order-service",
            "created_at": T0,
        }
    )
    # Then it loads, is found by its original id, counts as pending, and matches filters
    letter = store.get("5b0c8f3e-8a51-4c1e-9d41-2f3f0f6d1e11")
    assert letter is not None
    assert (letter.event_name, letter.original_id, letter.error, letter.retry_count, letter.source) == (
        "order.changes",
        "8264A1",
        "Reject: Bad Order",
        3,
        "order-service",
    )
    assert dict(letter.payload) == go_payload and letter.metadata["Content-Type"] == "application/json"
    assert letter.retried_at is None and letter.quarantined_at is None and letter.replay_count == 0
    assert store.get_by_original_id("8264A1") == letter
    assert store.count(me.DeadLetterFilter(exclude_retried=True, exclude_quarantined=True)) == 1
    assert store.count(me.DeadLetterFilter(error="bad order")) == 1  # case-insensitive, as in Go
    assert store.set_quarantine(letter.id, "manual")
    assert isinstance(coll.find_one({"_id": letter.id})["quarantined_at"], datetime)  # Go's *time.Time

    # When this library stores one for a real change event
    raw = {
        "_id": {"_data": "8264A2"},
        "operationType": "update",
        "ns": {"db": "shop", "coll": "orders"},
        "documentKey": {"_id": ObjectId("65f000000000000000000001")},
        "clusterTime": Timestamp(1772600767, 2),
        "updateDescription": {"updatedFields": {"qty": 2}, "removedFields": []},
    }
    letter_id = store.store(
        me.DeadLetter(
            id="py-1",
            event_name="orders",
            original_id="8264A2",
            payload=raw,
            metadata={
                "bus": "shop.orders",
                "namespace": "shop.orders",
                "operation": "update",
                "document_key": {"_id": ObjectId("65f000000000000000000001")},
                "cluster_time": Timestamp(1772600767, 2),
            },
            error="ValueError: boom",
            retry_count=4,
            source="shop.orders",
            created_at=datetime.now(timezone.utc),
        )
    )
    doc = coll.find_one({"_id": letter_id})
    # Then every Go field has Go's type: binary payload, string metadata, pointer times null
    assert_go_shape(
        doc,
        DLQ_SHAPE,
        required={"_id", "event_name", "original_id", "payload", "error", "retry_count", "created_at"},
        optional_null={"retried_at", "quarantined_at"},
    )
    assert all(isinstance(v, str) for v in doc["metadata"].values())
    assert (
        doc["metadata"]["document_key"] == "65f000000000000000000001"
    )  # Go's formatted key: the ObjectId's hex
    assert doc["metadata"]["cluster_time"] == "2026-03-04T05:06:07Z"  # Go's RFC 3339, to the second
    assert bson.decode(bytes(doc["payload"])) == raw  # the raw change document, for replay here
    got = store.get(letter_id)
    assert got is not None and dict(got.payload) == raw
    # And the indexes are Go's, by Go's names
    assert {
        "event_name_1",
        "created_at_1",
        "retried_at_1",
        "event_name_1_created_at_1",
        "uniq_event_original",
    } <= set(coll.index_information())
    assert coll.index_information()["uniq_event_original"]["unique"] is True


# -- monitor entries (em: monitor.MongoStore) ---------------------------------------------


MONITOR_SHAPE = {
    "event_id": STR,
    "subscription_id": STR,
    "subscriber_name": STR,
    "event_name": STR,
    "bus_id": STR,
    "instance_id": STR,
    "delivery_mode": STR,
    "metadata": DOC,
    "status": STR,
    "error": STR,
    "retry_count": INT,
    "started_at": DATE,
    "completed_at": DATE,
    "duration_ms": INT,
    "trace_id": STR,
    "span_id": STR,
    "worker_group": STR,
}


def test_monitor_entries(mongo_collection: Callable[[str], Any]) -> None:
    coll = mongo_collection("monitor_entries")
    store = MongoMonitorStore(coll.database, collection=coll.name)
    store.ensure_indexes()
    # Given entries written by the Go monitor store (ObjectId _id; omitempty fields left out)
    go_id = ObjectId()
    coll.insert_many(
        [
            {
                "_id": go_id,
                "event_id": "8264A1",
                "subscription_id": "sub-1",
                "subscriber_name": "billing",
                "event_name": "order.changes",
                "bus_id": "orders",
                "instance_id": "pod-7",
                "delivery_mode": "broadcast",
                "metadata": {"operation": "insert", "document_key": "7"},
                "status": "completed",
                "retry_count": 0,
                "started_at": T0,
                "completed_at": T0 + timedelta(milliseconds=12),
                "duration_ms": Int64(12),
                "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            },
            {
                "_id": ObjectId(),
                "event_id": "8264A1",
                "subscription_id": "$publish",
                "event_name": "order.changes",
                "bus_id": "orders",
                "instance_id": "orders",
                "delivery_mode": "broadcast",
                "status": "published",
                "retry_count": 0,
                "started_at": T0,
                "completed_at": T0,
            },
        ]
    )
    # Then they load, including Go's publish-audit entry
    entry = store.get("8264A1", "sub-1")
    assert entry is not None
    assert (entry.status, entry.event_name, entry.bus_id, entry.instance_id, entry.duration_ms) == (
        MonitorStatus.COMPLETED,
        "order.changes",
        "orders",
        "pod-7",
        12,
    )
    assert (
        entry.metadata == {"operation": "insert", "document_key": "7"}
        and entry.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    )
    assert {e.status for e in store.get_by_event_id("8264A1")} == {
        MonitorStatus.COMPLETED,
        MonitorStatus.PUBLISHED,
    }
    assert store.count() == 2
    # When this library updates Go's entry, it updates that document (no duplicate key)
    store.write(
        [
            MonitorEntry(
                "8264A1", "sub-1", "order.changes", "orders", MonitorStatus.FAILED, T0, "pod-7", "boom", 1
            )
        ]
    )
    assert coll.count_documents({"event_id": "8264A1", "subscription_id": "sub-1"}) == 1
    assert coll.find_one({"_id": go_id})["status"] == "failed"

    # When it writes an entry of its own
    store.write(
        [
            MonitorEntry(
                event_id="8264A2",
                subscription_id="orders",
                event_name="shop.orders",
                bus_id="shop.orders",
                status=MonitorStatus.COMPLETED,
                started_at=datetime.now(timezone.utc),
                instance_id="host:1",
                retry_count=1,
                completed_at=datetime.now(timezone.utc),
                duration_ms=3.75,
                metadata={"operation": "update", "document_key": {"_id": 42}, "replay": True},
            )
        ]
    )
    doc = coll.find_one({"event_id": "8264A2"})
    # Then the document has Go's fields and types
    assert isinstance(doc["_id"], ObjectId)
    assert_go_shape(
        doc,
        MONITOR_SHAPE,
        required={
            "event_id",
            "subscription_id",
            "event_name",
            "bus_id",
            "delivery_mode",
            "status",
            "retry_count",
            "started_at",
        },
    )
    assert doc["delivery_mode"] == "broadcast" and doc["duration_ms"] == 4
    assert doc["metadata"] == {"operation": "update", "document_key": "42", "replay": "true"}
    # And the indexes are Go's, by Go's default names
    info = coll.index_information()
    assert info["event_id_1_subscription_id_1"]["unique"] is True
    assert {
        "event_name_1_started_at_1_event_id_1_subscription_id_1",
        "status_1_started_at_1_event_id_1_subscription_id_1",
        "event_id_1_started_at_1",
        "bus_id_1_started_at_1",
        "subscriber_name_1_started_at_1",
        "started_at_1_event_id_1_subscription_id_1",
    } <= set(info)
