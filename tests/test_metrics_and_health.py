"""OpenTelemetry metrics and bus health, read after real events through the fake replica set."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pymongo
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import mongo_events as me
from mongo_events.testing import FakeReplicaSet

from .conftest import wait_for
from .helpers import QUICK, Recorder


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    """An in-memory reader; ``_provider(reader)`` is the SDK meter provider feeding it."""
    r = InMemoryMetricReader()
    providers[id(r)] = MeterProvider(metric_readers=[r])
    yield r
    providers.pop(id(r)).shutdown()


providers: dict[int, MeterProvider] = {}


def _provider(reader: InMemoryMetricReader) -> MeterProvider:
    return providers[id(reader)]


def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any, Any]]]:
    """name -> [(attributes, value or histogram point, unit)] from one collection."""
    out: dict[str, list[tuple[dict[str, Any], Any, Any]]] = {}
    data = reader.get_metrics_data()
    if data is None:
        return out
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    value = p.value if hasattr(p, "value") else p
                    out.setdefault(metric.name, []).append((dict(p.attributes or {}), value, metric.unit))
    return out


def test_metrics_after_real_events(
    client: pymongo.MongoClient[Any], make_bus: Any, reader: InMemoryMetricReader, fake_rs: FakeReplicaSet
) -> None:
    metrics = me.Metrics(meter_provider=_provider(reader))
    seen = Recorder()
    failed_once: set[Any] = set()
    bus = make_bus(client.shop.orders, metrics=metrics)

    @bus.subscribe(name="orders", max_retries=3, retry_backoff=QUICK)
    def handle(ev: me.ChangeEvent) -> None:
        if ev.document_id == 2 and 2 not in failed_once:
            failed_once.add(2)
            raise RuntimeError("first attempt fails")
        seen.add(ev.document_id)

    bus.start()
    client.shop.orders.insert_many([{"_id": i} for i in range(1, 4)])
    client.shop.orders.update_one({"_id": 1}, {"$set": {"x": 1}})
    seen.wait(4)
    assert bus.join(5)
    assert bus.flush()
    got = points(reader)

    processed = {
        (a["operation"], a["event"], a["namespace"]): v for a, v, _ in got["mongodb.changes.processed"]
    }
    assert processed == {("insert", "orders", "shop.orders"): 3, ("update", "orders", "shop.orders"): 1}
    assert [(a, v) for a, v, _ in got["mongodb.changes.failed"]] == [
        ({"event": "orders", "operation": "insert", "namespace": "shop.orders"}, 1)
    ]
    assert sum(v for _, v, _ in got["mongodb.changes.retries"]) == 1
    units = {name: rows[0][2] for name, rows in got.items()}
    assert units["mongodb.changes.processed"] == "{event}"
    assert (
        units["mongodb.oplog.lag"]
        == units["mongodb.handler.duration"]
        == units["mongodb.stream.receive_lag"]
        == "s"
    )

    lag = got["mongodb.oplog.lag"]
    assert {tuple(sorted(a)) for a, _, _ in lag} == {("event", "namespace")}
    assert sum(p.count for _, p, _ in lag) == 5  # every attempt, the retry included
    assert list(lag[0][1].explicit_bounds) == list(me.metrics.LAG_BUCKETS)
    duration = got["mongodb.handler.duration"]
    assert list(duration[0][1].explicit_bounds) == list(me.metrics.DURATION_BUCKETS)
    assert sum(p.count for _, p, _ in duration) == 5
    assert sum(p.count for _, p, _ in got["mongodb.stream.receive_lag"]) == 4

    assert got["mongodb.stream.active"] == [({"namespace": "shop.orders"}, 1, "{stream}")]
    assert got["mongodb.changes.pending"] == [({"namespace": "shop.orders"}, 0, "{event}")]
    ((age_attrs, age, _),) = got["mongodb.checkpoint.age"]
    assert age_attrs == {"namespace": "shop.orders"} and 0 <= age < 60
    ((_, headroom, _),) = got["mongodb.oplog.headroom"]
    assert headroom >= 0  # the fake keeps its whole oplog: the checkpoint is inside it

    bus.stop()
    after = points(reader)
    assert after["mongodb.stream.active"][0][1] == 0
    assert "mongodb.checkpoint.age" not in after  # a stopped bus is no longer observed


def test_pending_counts_this_process_unfinished_events_only(
    client: pymongo.MongoClient[Any], make_bus: Any, reader: InMemoryMetricReader
) -> None:
    """The gauge is process-local, like the Go library's: events this bus holds unfinished,
    not done events waiting for a checkpoint, and not other processes' pending ack records."""
    acks = me.MongoAckStore(client.internal["_event_acks"])
    acks.write([me.AckRecord("from-another-process", datetime.now(timezone.utc))])
    gate = threading.Event()
    started = Recorder()
    bus = make_bus(
        client.shop.orders,
        ack_store=acks,
        metrics=me.Metrics(meter_provider=_provider(reader)),
        flush_interval=3600,
    )

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        started.add(ev.document_id)
        if ev.document_id == 0:
            assert gate.wait(10)

    bus.start()
    client.shop.orders.insert_many([{"_id": i} for i in range(3)])
    started.wait(3)
    assert wait_for(lambda: bus.pending_count() == 1)  # 1 and 2 are done, 0 is not
    assert bus.in_flight == 3  # the window still holds all three (no checkpoint write yet)
    assert acks.pending_count() == 1  # the store's count spans every process (acks unwritten yet)
    assert points(reader)["mongodb.changes.pending"] == [({"namespace": "shop.orders"}, 1, "{event}")]
    gate.set()
    assert bus.join(5)
    assert bus.pending_count() == 0 and bus.health().pending == 0


def test_reconnections_count_with_their_reason(
    client: pymongo.MongoClient[Any], make_bus: Any, reader: InMemoryMetricReader, fake_rs: FakeReplicaSet
) -> None:
    bus = make_bus(client.shop.orders, metrics=me.Metrics(meter_provider=_provider(reader)))
    seen = Recorder()
    bus.subscribe(lambda ev: seen.add(ev.document_id))
    bus.start()
    # pymongo resumes once by itself and retries that read once: failing both reaches the watcher.
    fake_rs.drop_connection("getMore")
    fake_rs.drop_connection("aggregate", times=2)
    client.shop.orders.insert_one({"_id": 1})
    seen.wait(1)
    assert wait_for(lambda: bus.reconnections >= 1)
    rows = points(reader)["mongodb.stream.reconnections"]
    assert [(a, v) for a, v, _ in rows] == [({"namespace": "shop.orders", "reason": "error"}, 1)]
    assert bus.health().reconnections == 1


def test_namespace_prefixes_every_instrument(
    client: pymongo.MongoClient[Any], make_bus: Any, reader: InMemoryMetricReader
) -> None:
    bus = make_bus(
        client.shop.orders, metrics=me.Metrics(meter_provider=_provider(reader), namespace="orders")
    )
    seen = Recorder()
    bus.subscribe(lambda ev: seen.add(1))
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    seen.wait(1)
    assert bus.join(5)
    names = set(points(reader))
    assert "orders.mongodb.changes.processed" in names
    assert all(n.startswith("orders.mongodb.") for n in names)


def test_invalid_namespace_is_a_configuration_error() -> None:
    with pytest.raises(me.ConfigurationError, match="namespace"):
        me.Metrics(namespace="9 bad")


class _Broken:
    """A meter provider whose every instrument raises: handling must go on."""

    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("create_"):
            return lambda *a, **k: self
        if name in ("add", "record"):

            def fail(*a: Any, **k: Any) -> None:
                raise RuntimeError("exporter is down")

            return fail
        raise AttributeError(name)


def test_a_broken_metrics_backend_never_stops_event_handling(
    client: pymongo.MongoClient[Any], make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bus = make_bus(client.shop.orders, metrics=me.Metrics(meter_provider=_Broken()))
    seen = Recorder()
    bus.subscribe(lambda ev: seen.add(ev.document_id))
    bus.start()
    client.shop.orders.insert_many([{"_id": i} for i in range(5)])
    assert sorted(seen.wait(5)) == [0, 1, 2, 3, 4]
    assert bus.join(5)
    assert bus.state is me.BusState.RUNNING
    assert "metrics: recording" in caplog.text


def test_health_reports_the_running_bus(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    bus = make_bus(client.shop.orders)
    seen = Recorder()
    bus.subscribe(lambda ev: seen.add(1))
    assert bus.health().status == "unhealthy"  # not started
    bus.start()
    assert wait_for(lambda: bus.health().stream_active)
    client.shop.orders.insert_one({"_id": 1})
    seen.wait(1)
    assert bus.join(5) and bus.flush()
    health = bus.health()
    assert health.status == "healthy" and health.healthy
    assert health.state == "running" and health.namespace == "shop.orders"
    assert health.last_event_at is not None and health.lag is not None and health.lag >= 0
    assert health.checkpoint_age is not None and health.checkpoint_age < 60
    assert health.oplog_headroom is not None and health.oplog_headroom >= 0
    assert health.pending == 0 and health.in_flight == 0 and health.last_error is None
    body = health.to_json()
    assert body["status"] == "healthy" and body["last_event_at"].endswith("Z")
    bus.stop()
    assert bus.health().status == "unhealthy"


def test_health_without_oplog_access_omits_headroom(
    client: pymongo.MongoClient[Any], make_bus: Any, fake_rs: FakeReplicaSet
) -> None:
    bus = make_bus(client.shop.orders)
    bus.subscribe(lambda ev: None)
    bus.start()
    fake_rs.fail("find", code=13, message="not authorized on local to execute command")
    health = bus.health()
    assert health.oplog_headroom is None
    assert health.status == "healthy"


def test_health_is_degraded_after_a_store_error(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    class Failing(me.MemoryResumeTokenStore):
        broken = False

        def save(self, key: str, token: Any, cluster_time: Any = None) -> None:
            if self.broken:
                raise me.StoreError("token store is down")
            super().save(key, token, cluster_time)

    store = Failing()
    bus = make_bus(client.shop.orders, resume_token_store=store)
    seen = Recorder()
    bus.subscribe(lambda ev: seen.add(1))
    bus.start()
    store.broken = True
    client.shop.orders.insert_one({"_id": 1})
    seen.wait(1)
    assert wait_for(lambda: bus.health().last_error is not None)
    health = bus.health()
    assert health.status == "degraded" and "token store is down" in (health.last_error or "")
