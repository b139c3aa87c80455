"""OpenTelemetry metrics, read with the SDK's in-memory reader (use an OTLP or Prometheus exporter in production).

python examples/metrics.py
"""

from __future__ import annotations

import threading

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import mongo_events as me
from mongo_events.demo import demo_client


def main() -> int:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    with demo_client() as client:
        orders = client["shop"]["orders"]
        bus = me.Bus(
            orders,
            resume=False,
            metrics=me.Metrics(meter_provider=provider, namespace="shop"),
            flush_interval=0.1,
        )
        done = threading.Semaphore(0)
        bus.subscribe(name="orders")(lambda event: done.release())
        with bus:
            orders.insert_many([{"_id": i} for i in range(5)])
            ok = all(done.acquire(timeout=30) for _ in range(5))
            bus.join(10)
            data = reader.get_metrics_data()
            assert data is not None
            for rm in data.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        for point in metric.data.data_points:
                            value = getattr(point, "value", None)
                            shown = value if value is not None else f"count={point.count} sum={point.sum:.4f}"
                            print(f"{metric.name} {dict(point.attributes or {})} {shown}", flush=True)
    provider.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
