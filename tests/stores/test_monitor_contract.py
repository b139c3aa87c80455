"""The monitor store contract, run against memory, mongomock and the fake replica set."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from mongo_events.monitor import (
    MemoryMonitorStore,
    MongoMonitorStore,
    MonitorEntry,
    MonitorFilter,
    MonitorStatus,
    MonitorStore,
)

NOW = datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture(params=["memory", "mongo"])
def store(request: pytest.FixtureRequest, mongo_collection: Callable[[str], Any]) -> MonitorStore:
    if request.param == "memory":
        return MemoryMonitorStore()
    coll = mongo_collection("monitor_entries")
    s = MongoMonitorStore(coll.database)
    s.ensure_indexes()
    return s


def entry(
    event: str,
    sub: str = "s",
    *,
    minutes_ago: float = 0,
    status: MonitorStatus = MonitorStatus.COMPLETED,
    **kw: Any,
) -> MonitorEntry:
    return MonitorEntry(
        event_id=event,
        subscription_id=sub,
        event_name=kw.pop("event_name", "shop.orders"),
        bus_id=kw.pop("bus_id", "bus"),
        status=status,
        started_at=NOW - timedelta(minutes=minutes_ago),
        instance_id=kw.pop("instance_id", "host:1"),
        **kw,
    )


def test_write_upserts_and_get_reads_back(store: MonitorStore) -> None:
    store.write([entry("e1", status=MonitorStatus.PENDING, metadata={"operation": "insert"})])
    store.write(
        [
            entry(
                "e1",
                status=MonitorStatus.COMPLETED,
                duration_ms=12.0,
                completed_at=NOW,
                metadata={"operation": "insert"},
            )
        ]
    )
    got = store.get("e1", "s")
    assert got is not None
    assert got.status is MonitorStatus.COMPLETED and got.duration_ms == 12  # whole ms in MongoDB (Go's int64)
    assert got.started_at == NOW and got.completed_at == NOW
    assert got.metadata == {"operation": "insert"}
    assert store.get("e1", "other") is None
    assert store.count() == 1


def test_get_by_event_id_returns_every_subscription(store: MonitorStore) -> None:
    store.write([entry("e1", "a"), entry("e1", "b"), entry("e2", "a")])
    assert sorted(e.subscription_id for e in store.get_by_event_id("e1")) == ["a", "b"]


def test_filters(store: MonitorStore) -> None:
    store.write(
        [
            entry("e1", "a", minutes_ago=30, duration_ms=5.0),
            entry(
                "e2",
                "a",
                minutes_ago=20,
                status=MonitorStatus.FAILED,
                error="boom",
                retry_count=3,
                duration_ms=50.0,
            ),
            entry(
                "e3",
                "b",
                minutes_ago=10,
                status=MonitorStatus.RETRYING,
                error="slow",
                retry_count=1,
                event_name="shop.users",
            ),
            entry(
                "e4", "b", minutes_ago=1, status=MonitorStatus.PENDING, bus_id="other", instance_id="host:2"
            ),
        ]
    )

    def ids(**kw: Any) -> list[str]:
        return [e.event_id for e in store.list(MonitorFilter(**kw)).entries]

    assert ids() == ["e1", "e2", "e3", "e4"]
    assert ids(event_id="e2") == ["e2"]
    assert ids(subscription_id="b") == ["e3", "e4"]
    assert ids(event_name="shop.users") == ["e3"]
    assert ids(bus_id="other") == ["e4"]
    assert ids(instance_id="host:2") == ["e4"]
    assert ids(statuses=[MonitorStatus.FAILED, MonitorStatus.RETRYING]) == ["e2", "e3"]
    assert ids(has_error=True) == ["e2", "e3"]
    assert ids(has_error=False) == ["e1", "e4"]
    assert ids(start_time=NOW - timedelta(minutes=20)) == ["e2", "e3", "e4"]  # inclusive
    assert ids(end_time=NOW - timedelta(minutes=10)) == ["e1", "e2"]  # exclusive
    assert ids(min_duration=timedelta(milliseconds=10)) == ["e2"]
    assert ids(min_retries=1) == ["e2", "e3"]
    assert ids(order_desc=True) == ["e4", "e3", "e2", "e1"]
    assert store.count(MonitorFilter(has_error=True)) == 2


@pytest.mark.parametrize("desc", [False, True])
def test_keyset_pagination_walks_every_entry_once(store: MonitorStore, desc: bool) -> None:
    # Ties on started_at are broken by event id and subscription.
    store.write([entry(f"e{i:02d}", sub, minutes_ago=i // 4) for i in range(25) for sub in ("a", "b")])
    seen: list[tuple[str, str]] = []
    cursor = None
    pages = 0
    while True:
        page = store.list(MonitorFilter(limit=7, cursor=cursor, order_desc=desc))
        seen += [(e.event_id, e.subscription_id) for e in page.entries]
        pages += 1
        if not page.has_more:
            assert page.next_cursor is None
            break
        cursor = page.next_cursor
    assert len(seen) == 50 and len(set(seen)) == 50
    assert pages == 8
    keys = [(store.get(e, s).started_at, e, s) for e, s in seen]  # type: ignore[union-attr]
    assert keys == sorted(keys, reverse=desc)


def test_limit_is_capped_at_1000(store: MonitorStore) -> None:
    store.write([entry(f"e{i:04d}") for i in range(1005)])
    page = store.list(MonitorFilter(limit=5000))
    assert len(page.entries) == 1000 and page.has_more


def test_summary_defaults_to_the_last_24_hours(store: MonitorStore) -> None:
    store.write(
        [
            entry("e1", duration_ms=10.0),
            entry("e2", duration_ms=30.0),
            entry("e3", status=MonitorStatus.FAILED, error="x", duration_ms=20.0),
            entry("e4", status=MonitorStatus.PENDING, event_name="shop.users", instance_id="host:2"),
            entry("old", minutes_ago=60 * 25),
        ]
    )
    s = store.summary()
    assert s.total_entries == 4
    assert s.by_status == {"completed": 2, "failed": 1, "pending": 1}
    orders = s.by_event_name["shop.orders"]
    assert (orders.total, orders.completed, orders.failed, orders.pending) == (3, 2, 1, 0)
    assert orders.avg_duration_ms == 20.0 and orders.error_rate == round(1 / 3, 4)
    assert s.by_instance == {"host:1": 3, "host:2": 1}
    assert s.error_rate == 0.25
    assert s.oldest == NOW and s.newest == NOW
    wide = store.summary(MonitorFilter(start_time=NOW - timedelta(days=2)))
    assert wide.total_entries == 5
    assert wide.to_json()["time_range"]["oldest"].endswith("Z")


def test_stuck_pending(store: MonitorStore) -> None:
    store.write(
        [
            entry("old", status=MonitorStatus.PENDING, minutes_ago=30),
            entry("older", status=MonitorStatus.PENDING, minutes_ago=60),
            entry("fresh", status=MonitorStatus.PENDING, minutes_ago=0),
            entry("done", minutes_ago=90),
        ]
    )
    assert [e.event_id for e in store.stuck_pending(timedelta(minutes=10))] == ["older", "old"]
    assert store.stuck_pending_count(timedelta(minutes=10)) == 2


def test_delete_older_than(store: MonitorStore) -> None:
    store.write([entry("new"), entry("old", minutes_ago=60 * 48)])
    assert store.delete_older_than(timedelta(hours=24)) == 1
    assert [e.event_id for e in store.list().entries] == ["new"]


def test_mongo_indexes_are_the_seeds(mongo_collection: Callable[[str], Any]) -> None:
    coll = mongo_collection("monitor_entries")
    MongoMonitorStore(coll.database, ttl=timedelta(days=7)).ensure_indexes()
    info = coll.index_information()
    # The Go monitor store's indexes, under the names Go gives them.
    assert info["event_id_1_subscription_id_1"]["unique"] is True
    assert list(info["event_id_1_subscription_id_1"]["key"]) == [("event_id", 1), ("subscription_id", 1)]
    assert info["started_at_ttl"]["expireAfterSeconds"] == 7 * 86400
    assert {
        "event_name_1_started_at_1_event_id_1_subscription_id_1",
        "status_1_started_at_1_event_id_1_subscription_id_1",
        "event_id_1_started_at_1",
        "bus_id_1_started_at_1",
        "subscriber_name_1_started_at_1",
        "started_at_1_event_id_1_subscription_id_1",
    } <= set(info)


def test_invalid_cursor_and_limit_say_what_to_do(store: MonitorStore) -> None:
    from mongo_events import ConfigurationError

    with pytest.raises(ConfigurationError, match="next_cursor"):
        store.list(MonitorFilter(cursor="not-a-cursor"))
    with pytest.raises(ConfigurationError, match="limit"):
        MonitorFilter(limit=0)
