"""The demo behind ``mongo-events demo``: a bus consuming changes as they are written.

Uses ``MONGODB_URI`` when set (a replica set), else starts the built-in fake
replica set (a test double; install the ``testing`` extra).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

import pymongo

from .bus import Bus
from .delivery import Delivery
from .events import ChangeEvent, FullDocument

__all__ = ["run_demo", "demo_client", "demo_uri"]


@contextlib.contextmanager
def demo_uri(uri: str | None = None, out: TextIO = sys.stderr) -> Iterator[str]:
    """``uri``, else ``MONGODB_URI``, else the URI of a fake replica set started for the occasion."""
    uri = uri or os.environ.get("MONGODB_URI")
    if uri:
        yield uri
        return
    try:
        from .testing import FakeReplicaSet
    except ImportError as exc:  # pragma: no cover - mongomock missing
        raise SystemExit(
            "the demo needs MONGODB_URI or the fake replica set: pip install 'mongo-events[testing]'"
        ) from exc
    with FakeReplicaSet() as rs:
        print(f"MONGODB_URI is not set: using the built-in fake replica set at {rs.uri}", file=out)
        yield rs.uri


@contextlib.contextmanager
def demo_client(uri: str | None = None, out: TextIO = sys.stderr) -> Iterator[pymongo.MongoClient[Any]]:
    """A client for :func:`demo_uri`."""
    with demo_uri(uri, out) as resolved:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(resolved)
        try:
            yield client
        finally:
            client.close()


def run_demo(uri: str | None = None, orders: int = 5, out: TextIO = sys.stdout, timeout: float = 30.0) -> int:
    """Start a bus on ``demo.orders``, write a few orders, print what the bus delivers."""
    with demo_client(uri) as client:
        coll = client["mongo_events_demo"]["orders"]
        bus = Bus(coll, full_document=FullDocument.UPDATE_LOOKUP, resume=False, max_await_time=0.2)
        received = threading.Semaphore(0)

        @bus.subscribe
        def show(event: ChangeEvent, delivery: Delivery) -> None:
            doc = event.full_document or {}
            # one write per line: callbacks run on several worker threads at once
            out.write(
                f"{event.operation_type:<8} {event.namespace} _id={event.document_id} status={doc.get('status')} (attempt {delivery.attempt})\n"
            )
            out.flush()
            received.release()

        with bus:
            ids = []
            for i in range(orders):
                ids.append(coll.insert_one({"item": f"book-{i}", "status": "new"}).inserted_id)
            for oid in ids:
                coll.update_one({"_id": oid}, {"$set": {"status": "paid"}})
            for _ in range(2 * orders):
                if not received.acquire(timeout=timeout):
                    print("timed out waiting for changes", file=sys.stderr)
                    return 1
        print(f"delivered {2 * orders} changes; bus {bus.state.value}", file=out)
    return 0
