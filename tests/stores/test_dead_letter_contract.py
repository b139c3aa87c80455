"""Every dead-letter store keeps the same contract."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from bson import ObjectId

from mongo_events import (
    DeadLetter,
    DeadLetterFilter,
    DeadLetterStore,
    MemoryDeadLetterStore,
    MongoDeadLetterStore,
)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc).replace(tzinfo=None)


def letter(
    original: str,
    event: str = "orders",
    minutes: int = 0,
    error: str = "ValueError: boom",
    retries: int = 3,
    source: str = "bus",
) -> DeadLetter:
    return DeadLetter(
        id=str(ObjectId()),
        event_name=event,
        original_id=original,
        payload={"_id": {"_data": original}, "operationType": "insert"},
        metadata={"namespace": "shop.orders"},
        error=error,
        retry_count=retries,
        source=source,
        created_at=T0 + timedelta(minutes=minutes),
    )


@pytest.fixture(params=["memory", "mongo"])
def make_store(
    request: pytest.FixtureRequest, mongo_collection: Callable[[str], Any]
) -> Callable[..., DeadLetterStore]:
    counter = iter(range(100))

    def make(dedup: bool = True) -> DeadLetterStore:
        if request.param == "memory":
            return MemoryDeadLetterStore(dedup=dedup)
        s = MongoDeadLetterStore(mongo_collection(f"event_dlq_{next(counter)}"), dedup=dedup)
        s.ensure_indexes()
        return s

    return make


def test_store_get_and_get_by_original_id(make_store: Callable[..., DeadLetterStore]) -> None:
    store = make_store()
    first = letter("a")
    assert store.store(first) == first.id
    got = store.get(first.id)
    assert got is not None and got.payload == first.payload and got.error == "ValueError: boom"
    assert got.metadata == {"namespace": "shop.orders"} and got.retry_count == 3
    assert store.get_by_original_id("a") == got
    assert store.get("nope") is None and store.get_by_original_id("nope") is None


def test_dedup_increments_retry_count_and_refreshes_the_error(
    make_store: Callable[..., DeadLetterStore],
) -> None:
    store = make_store()
    first = store.store(letter("a", retries=3))
    again = store.store(letter("a", retries=2, error="TypeError: new"))
    assert again == first and store.count() == 1
    got = store.get(first)
    assert got is not None and got.retry_count == 5 and got.error == "TypeError: new"
    plain = make_store(dedup=False)
    plain.store(letter("a"))
    plain.store(letter("a"))
    assert plain.count() == 2


def test_filters(make_store: Callable[..., DeadLetterStore]) -> None:
    store = make_store()
    ids = [
        store.store(letter("a", "orders", 0, "ValueError: bad qty", 1, "bus1")),
        store.store(letter("b", "orders", 1, "KeyError: sku", 5, "bus1")),
        store.store(letter("c", "customers", 2, "ValueError: bad name", 2, "bus2")),
    ]
    assert store.count(DeadLetterFilter(event_name="orders")) == 2
    assert store.count(DeadLetterFilter(error="ValueError")) == 2
    assert store.count(DeadLetterFilter(error="qty")) == 1
    assert store.count(DeadLetterFilter(max_retries=2)) == 2
    assert store.count(DeadLetterFilter(source="bus2")) == 1
    assert [d.original_id for d in store.list(DeadLetterFilter(start=T0 + timedelta(minutes=1)))] == [
        "b",
        "c",
    ]
    assert [d.original_id for d in store.list(DeadLetterFilter(end=T0 + timedelta(minutes=1)))] == ["a"]
    assert [d.original_id for d in store.list(DeadLetterFilter(limit=1, offset=1))] == ["b"]
    store.update(ids[0], retried_at=T0)
    store.update(ids[1], quarantined_at=T0, replay_count=3)
    assert store.count(DeadLetterFilter(exclude_retried=True)) == 2
    assert store.count(DeadLetterFilter(exclude_quarantined=True)) == 2
    assert store.get(ids[1]).replay_count == 3  # type: ignore[union-attr]


def test_stats(make_store: Callable[..., DeadLetterStore]) -> None:
    store = make_store()
    a = store.store(letter("a", "orders", 0, "ValueError: x"))
    store.store(letter("b", "orders", 5, "ValueError: x"))
    c = store.store(letter("c", "customers", 9, "KeyError: y"))
    store.update(a, retried_at=T0)
    store.update(c, quarantined_at=T0)
    stats = store.stats()
    assert (stats.total, stats.pending, stats.retried, stats.quarantined) == (3, 1, 1, 1)
    assert stats.by_event == {"orders": 2, "customers": 1}
    assert stats.by_error == {"ValueError: x": 2, "KeyError: y": 1}
    assert stats.oldest == T0 and stats.newest == T0 + timedelta(minutes=9)


def test_delete_and_delete_by_filter(make_store: Callable[..., DeadLetterStore]) -> None:
    store = make_store()
    a = store.store(letter("a", minutes=0))
    store.store(letter("b", minutes=10))
    store.store(letter("c", minutes=20))
    assert store.delete(a) is True and store.delete(a) is False
    assert store.delete_by_filter(DeadLetterFilter(end=T0 + timedelta(minutes=15))) == 1
    assert [d.original_id for d in store.list()] == ["c"]


def test_error_filter_ignores_case_as_gos_does(make_store: Callable[..., DeadLetterStore]) -> None:
    store = make_store()
    store.store(letter("a", error="ValueError: Connection Refused"))
    store.store(letter("b", error="KeyError: 'sku'"))
    assert [d.original_id for d in store.list(DeadLetterFilter(error="connection refused"))] == ["a"]
    assert store.count(DeadLetterFilter(error="CONNECTION")) == 1
    assert store.count(DeadLetterFilter(error="valueerror: connection refused")) == 1
    assert store.count(DeadLetterFilter(error="timeout")) == 0


def test_set_quarantine_records_the_reason_and_lifts_it(make_store: Callable[..., DeadLetterStore]) -> None:
    store = make_store()
    first = letter("a")
    store.store(first)
    assert store.set_quarantine(first.id, "bad data") is True
    got = store.get(first.id)
    assert got is not None and got.quarantined_at is not None and got.quarantine_reason == "bad data"
    assert store.count(DeadLetterFilter(exclude_quarantined=True)) == 0
    assert store.set_quarantine(first.id, None) is True
    got = store.get(first.id)
    assert got is not None and got.quarantined_at is None and got.quarantine_reason is None
    assert store.count(DeadLetterFilter(exclude_quarantined=True)) == 1
    assert store.set_quarantine("missing", "x") is False


def test_the_base_set_quarantine_quarantines_through_update_and_cannot_lift() -> None:
    store = MemoryDeadLetterStore()
    first = letter("a")
    store.store(first)
    assert DeadLetterStore.set_quarantine(store, first.id, "bad data") is True  # the ABC's fallback
    got = store.get(first.id)
    assert got is not None and got.quarantined_at is not None
    assert DeadLetterStore.set_quarantine(store, "missing", "x") is False
    with pytest.raises(NotImplementedError, match="cannot lift"):
        DeadLetterStore.set_quarantine(store, first.id, None)
