"""The production setup of the Go library's README, in Python: a resume-token collection and id,
an ack store, dead letters, metrics, the monitor store and its HTTP API, and health.

    python examples/full.py
"""

from __future__ import annotations

import dataclasses
import json
import threading
import urllib.request
from datetime import timedelta
from wsgiref.simple_server import WSGIRequestHandler, make_server

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import mongo_events as me
from mongo_events.demo import demo_client
from mongo_events.monitor import MongoMonitorStore, wsgi_app


@dataclasses.dataclass
class Order:
    _id: int
    status: str


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    with demo_client() as client:
        internal = client["shop_internal"]
        monitor = MongoMonitorStore(internal, ttl=timedelta(days=7))
        bus = me.Bus(
            client["shop"]["orders"],
            full_document=me.FullDocument.UPDATE_LOOKUP,
            full_document_only=True,
            resume_token_collection=internal["_event_resume_tokens"],
            resume_token_id="orders-worker",
            ack_store=me.MongoAckStore(internal["_event_acks"], ttl=timedelta(days=1)),
            dead_letters=me.MongoDeadLetterStore(internal["event_dlq"]),
            metrics=me.Metrics(meter_provider=provider),
            monitor=monitor,
            start_from_past=timedelta(minutes=5),
            max_workers=4,
            flush_interval=0.2,
        )
        done = threading.Semaphore(0)

        @bus.subscribe(payload=Order, name="fulfil", max_retries=3)
        def fulfil(order: Order, delivery: me.Delivery) -> None:
            print(f"fulfilling order {order._id} ({order.status}), attempt {delivery.attempt}", flush=True)
            done.release()

        server = make_server("127.0.0.1", 0, wsgi_app(monitor, health=bus.health), handler_class=_Quiet)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}"
        try:
            with bus:
                client["shop"]["orders"].insert_many([{"_id": i, "status": "new"} for i in range(3)])
                ok = all(done.acquire(timeout=30) for _ in range(3))
                bus.join(10)
                bus.flush()
                for path in ("/v1/monitor/entries/count", "/v1/monitor/summary", "/v1/health"):
                    with urllib.request.urlopen(base + path, timeout=10) as resp:
                        body = json.loads(resp.read())
                    print(path, json.dumps({k: body[k] for k in list(body)[:4]}), flush=True)
                print("pending acks:", bus.ack_store.pending_count() if bus.ack_store else None, flush=True)
        finally:
            server.shutdown()
        print("checkpoint stored under", bus.resume_token_key, flush=True)
    provider.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
