"""``Metrics(pending=fn)`` and ``Metrics.close()``: Go's ``SetPendingCallback`` and ``Close``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pymongo
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import mongo_events as me

from .helpers import Recorder


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    r = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[r])
    r.provider = provider  # type: ignore[attr-defined]
    yield r
    provider.shutdown()


def gauge(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], Any]]:
    data = reader.get_metrics_data()
    out: list[tuple[dict[str, Any], Any]] = []
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    out.extend((dict(p.attributes or {}), p.value) for p in metric.data.data_points)
    return out


def test_pending_reports_the_callable_instead_of_this_process(
    client: pymongo.MongoClient[Any], make_bus: Any, reader: InMemoryMetricReader
) -> None:
    # Given an ack store shared by "every instance", with two records pending from another one
    acks = me.MemoryAckStore()
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    acks.write([me.AckRecord("elsewhere-1", now), me.AckRecord("elsewhere-2", now)])
    metrics = me.Metrics(
        meter_provider=reader.provider, pending=lambda: acks.count(me.AckFilter(status=me.AckStatus.PENDING))
    )  # type: ignore[attr-defined]
    release = threading.Event()
    started = Recorder()
    bus = make_bus(client.shop.orders, metrics=metrics)

    @bus.subscribe(name="h")
    def slow(ev: me.ChangeEvent) -> None:
        started.add(ev.id)
        release.wait(10)

    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    started.wait(1)
    assert bus.pending_count() == 1  # this process holds one ...
    # ... but the gauge reports the callable: the ack store's count, one unattributed point
    assert gauge(reader, "mongodb.changes.pending") == [({}, 2)]
    release.set()


def test_pending_callable_failures_and_none_report_nothing(
    reader: InMemoryMetricReader, caplog: pytest.LogCaptureFixture
) -> None:
    answers: list[Any] = [None, RuntimeError("ack store down"), 7]

    def pending() -> int | None:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]

    me.Metrics(meter_provider=reader.provider, pending=pending)  # type: ignore[attr-defined]
    assert gauge(reader, "mongodb.changes.pending") == []
    assert gauge(reader, "mongodb.changes.pending") == []
    assert any("pending callable" in r.getMessage() for r in caplog.records)
    assert gauge(reader, "mongodb.changes.pending") == [({}, 7)]


def test_pending_must_be_callable() -> None:
    with pytest.raises(me.ConfigurationError, match="pending"):
        me.Metrics(pending=5)  # type: ignore[arg-type]


def test_close_stops_every_observable_gauge(
    client: pymongo.MongoClient[Any], make_bus: Any, reader: InMemoryMetricReader
) -> None:
    calls = Recorder()
    metrics = me.Metrics(meter_provider=reader.provider, pending=lambda: calls.add(1) or 3)  # type: ignore[attr-defined]
    bus = make_bus(client.shop.orders, metrics=metrics)
    bus.subscribe(lambda ev: None, name="h")
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    assert bus.join(5) and bus.flush()
    assert gauge(reader, "mongodb.changes.pending") == [({}, 3)]
    assert gauge(reader, "mongodb.checkpoint.age") != []
    metrics.close()
    before = len(calls)
    assert gauge(reader, "mongodb.changes.pending") == []
    assert gauge(reader, "mongodb.checkpoint.age") == []
    assert len(calls) == before  # the callable is no longer called
    # A bus started after close() does not bring the gauges back.
    other = make_bus(client.shop.customers, metrics=metrics)
    other.subscribe(lambda ev: None, name="h")
    other.start()
    assert gauge(reader, "mongodb.checkpoint.age") == []
