"""The dead-letter manager's Go-parity parts: quarantine by hand, health, and the dlq.* metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pymongo
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import mongo_events as me

from .conftest import wait_for


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    r = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[r])
    r.provider = provider  # type: ignore[attr-defined]
    yield r
    provider.shutdown()


def counters(reader: InMemoryMetricReader) -> dict[str, dict[tuple[tuple[str, str], ...], int]]:
    """name -> {sorted attributes: value} of every counter point."""
    out: dict[str, dict[tuple[tuple[str, str], ...], int]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    if not hasattr(p, "value"):
                        continue  # a histogram
                    out.setdefault(metric.name, {})[tuple(sorted(dict(p.attributes or {}).items()))] = p.value
    return out


def _failing_bus(
    client: pymongo.MongoClient[Any], make_bus: Any, dlq: me.DeadLetterStore, **options: Any
) -> tuple[me.Bus, dict[str, bool]]:
    broken = {"now": True}
    bus = make_bus(client.shop.orders, dead_letters=dlq, **options)

    @bus.subscribe(name="orders", max_retries=0)
    def handle(ev: me.ChangeEvent) -> None:
        if broken["now"] or ev.document_id == "forbidden":
            raise (PermissionError if ev.document_id == "forbidden" else RuntimeError)("still broken")

    bus.start()
    return bus, broken


def test_quarantine_by_hand_holds_a_letter_back_until_unquarantined(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    dlq = me.MemoryDeadLetterStore()
    bus, broken = _failing_bus(client, make_bus, dlq)
    client.shop.orders.insert_many([{"_id": 1}, {"_id": 2}])
    assert wait_for(lambda: dlq.count() == 2)
    held, other = dlq.list()
    manager = me.DeadLetters(dlq, bus)
    manager.quarantine(held.id, "customer asked us to wait")
    got = manager.get(held.id)
    assert (
        got is not None
        and got.quarantined_at is not None
        and got.quarantine_reason == "customer asked us to wait"
    )
    broken["now"] = False
    assert manager.replay() == me.ReplayResult(replayed=1)  # only the other one
    assert manager.replay_one(held.id) is me.ReplayOutcome.SKIPPED
    manager.unquarantine(held.id)
    got = manager.get(held.id)
    assert got is not None and got.quarantined_at is None
    assert manager.replay() == me.ReplayResult(replayed=1)
    assert all(d.retried_at is not None for d in dlq.list())
    with pytest.raises(KeyError):
        manager.quarantine("no-such-letter")
    with pytest.raises(KeyError):
        manager.unquarantine("no-such-letter")
    with pytest.raises(ValueError, match="reason"):
        manager.quarantine(other.id, "")


def test_automatic_quarantines_record_why(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    dlq = me.MemoryDeadLetterStore()
    bus, _ = _failing_bus(client, make_bus, dlq)
    client.shop.orders.insert_many([{"_id": "flaky"}, {"_id": "forbidden"}])
    assert wait_for(lambda: dlq.count() == 2)
    manager = me.DeadLetters(
        dlq, bus, max_replay_attempts=1, is_terminal=lambda e: isinstance(e, PermissionError)
    )
    assert manager.replay() == me.ReplayResult(quarantined=2)
    reasons = {d.payload["documentKey"]["_id"]: d.quarantine_reason for d in dlq.list()}
    assert reasons == {"flaky": "max_replay_attempts", "forbidden": "terminal_error"}


def test_health_is_degraded_while_letters_wait_and_unhealthy_when_the_store_fails(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    dlq = me.MemoryDeadLetterStore()
    bus, broken = _failing_bus(client, make_bus, dlq)
    manager = me.DeadLetters(dlq, bus)
    assert manager.health() == me.DeadLetterHealth("healthy")
    client.shop.orders.insert_many([{"_id": 1}, {"_id": 2}])
    assert wait_for(lambda: dlq.count() == 2)
    first, _second = dlq.list()
    manager.quarantine(first.id)
    health = manager.health()
    assert (health.status, health.pending, health.quarantined, health.total) == ("degraded", 1, 1, 2)
    assert health.healthy and health.to_json()["status"] == "degraded"
    broken["now"] = False
    manager.replay()
    assert manager.health().status == "healthy"  # replayed and quarantined letters wait for nothing

    class Down(me.MemoryDeadLetterStore):
        def count(self, filter: me.DeadLetterFilter = me.DeadLetterFilter()) -> int:  # noqa: B008
            raise me.StoreError("dead-letter store unreachable")

    health = me.DeadLetters(Down()).health()
    assert health.status == "unhealthy" and not health.healthy and "unreachable" in (health.error or "")


def test_dlq_metrics_count_stored_replayed_failed_and_quarantined(
    client: pymongo.MongoClient[Any], make_bus: Any, reader: InMemoryMetricReader
) -> None:
    metrics = me.Metrics(meter_provider=reader.provider)  # type: ignore[attr-defined]
    dlq = me.MemoryDeadLetterStore()
    bus, broken = _failing_bus(client, make_bus, dlq, metrics=metrics)
    client.shop.orders.insert_many([{"_id": "a"}, {"_id": "b"}, {"_id": "forbidden"}])
    assert wait_for(lambda: dlq.count() == 3)
    manager = me.DeadLetters(
        dlq, bus, max_replay_attempts=5, is_terminal=lambda e: isinstance(e, PermissionError)
    )
    assert manager.metrics is metrics  # taken from the bus
    first = next(d for d in dlq.list() if d.payload["documentKey"]["_id"] == "a")
    manager.quarantine(first.id)
    broken["now"] = False
    assert manager.replay() == me.ReplayResult(replayed=1, quarantined=1)
    broken["now"] = True
    manager.unquarantine(first.id)
    assert manager.replay_one(first.id) is me.ReplayOutcome.FAILED
    got = counters(reader)
    orders = (("event", "orders"),)
    assert got["dlq.messages"] == {orders: 3}
    assert got["dlq.messages.replayed"] == {orders: 1}
    assert got["dlq.replay.failure"] == {orders: 2}  # "forbidden" once, "a" once
    assert got["dlq.messages.quarantined"] == {
        (("event", "orders"), ("reason", "manual")): 1,
        (("event", "orders"), ("reason", "terminal_error")): 1,
    }


def test_go_letters_without_a_change_document_are_skipped_not_replayed(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    from datetime import datetime, timezone

    dlq = me.MemoryDeadLetterStore()
    bus, broken = _failing_bus(client, make_bus, dlq)
    broken["now"] = False
    go_letter = me.DeadLetter(
        id="8b0e1f3c-5d1e-4b7a-9a51-2f4f1f0f6d11",
        event_name="orders",
        original_id="8264A1B2C3",
        payload={"id": "8264A1B2C3", "operation_type": "insert", "database": "shop", "collection": "orders"},
        metadata={"Content-Type": "application/json"},
        error="reject: bad order",
        retry_count=0,
        source="order-service",
        created_at=datetime.now(timezone.utc),
    )
    dlq.store(go_letter)
    assert me.DeadLetters(dlq, bus).replay_one(go_letter.id) is me.ReplayOutcome.SKIPPED
    got = dlq.get(go_letter.id)
    assert got is not None and got.retried_at is None and got.replay_count == 0
