"""Every ack store keeps the same contract."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from mongo_events import AckFilter, AckRecord, AckStatus, AckStore, MemoryAckStore, MongoAckStore

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc).replace(tzinfo=None)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture(params=["memory", "mongo"])
def store(request: pytest.FixtureRequest, mongo_collection: Callable[[str], Any]) -> AckStore:
    if request.param == "memory":
        return MemoryAckStore()
    s = MongoAckStore(mongo_collection("_event_acks"), ttl=None)
    s.ensure_indexes()
    return s


def test_pending_then_acked_keeps_the_first_created_at(store: AckStore) -> None:
    store.write([AckRecord("e1", at(0)), AckRecord("e2", at(1))])
    assert store.get("e1") == AckRecord("e1", at(0), None)
    assert store.get("e1").status is AckStatus.PENDING  # type: ignore[union-attr]
    store.write([AckRecord("e1", at(5), acked_at=at(2))])
    record = store.get("e1")
    assert record is not None and record.created_at == at(0) and record.acked_at == at(2)
    assert record.status is AckStatus.ACKED
    assert store.pending_count() == 1


def test_one_batch_can_record_and_ack(store: AckStore) -> None:
    store.write([AckRecord("e1", at(0), acked_at=at(1))])
    assert store.get("e1") == AckRecord("e1", at(0), at(1))
    assert store.get("missing") is None


def test_list_and_count_by_status_time_and_page(store: AckStore) -> None:
    store.write([AckRecord(f"e{i}", at(i), acked_at=at(i) if i % 2 else None) for i in range(10)])
    assert store.count() == 10
    assert store.count(AckFilter(status=AckStatus.PENDING)) == 5
    assert [r.event_id for r in store.list(AckFilter(status=AckStatus.ACKED, limit=2))] == ["e1", "e3"]
    assert [r.event_id for r in store.list(AckFilter(start=at(3), end=at(6)))] == [
        "e3",
        "e4",
        "e5",
    ]  # end exclusive
    assert [r.event_id for r in store.list(AckFilter(limit=3, offset=8))] == ["e8", "e9"]
    assert store.count(AckFilter(start=at(3), end=at(6), limit=1)) == 3  # count ignores the page


@pytest.mark.parametrize("limit", [0, 1001])
def test_limits_are_checked(limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        AckFilter(limit=limit)


def test_mongo_store_indexes_and_shape(mongo_collection: Callable[[str], Any]) -> None:
    coll = mongo_collection("_event_acks")
    store = MongoAckStore(coll, ttl=timedelta(hours=24))
    store.ensure_indexes()
    store.write([AckRecord("e1", at(0))])
    zero = datetime(1, 1, 1)  # Go's zero time.Time: the Go library's "pending"
    assert coll.find_one({"_id": "e1"}) == {"_id": "e1", "created_at": at(0), "acked_at": zero}
    indexes = coll.index_information()
    assert indexes["acked_at_1"]["expireAfterSeconds"] == 86400

    def bound(index: str, op: str) -> datetime:  # mongomock keeps the time zone, a server drops it
        value: datetime = indexes[index]["partialFilterExpression"]["acked_at"][op]
        return value.replace(tzinfo=None)

    assert bound("acked_at_1", "$gt") == zero
    assert bound("acked_at_pending", "$eq") == zero
