"""The initial snapshot: documents per second delivered as ``snapshot`` events, against a
raw ``find()`` loop over the same collection (sorted by ``_id``, as the snapshot reads).

The two alternate over the repetitions and the ratio is taken within each repetition
(target: at least 0.5). ``python -m benchmarks`` runs it (see :func:`run`);
``python -m benchmarks.snapshot [--quick]`` runs it alone.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import uuid
from typing import Any

import pymongo

import mongo_events as me


def load(client: pymongo.MongoClient[Any], n: int) -> Any:
    """A fresh collection of ``n`` documents of about 1 KB."""
    from .run import document

    coll = client["bench_snapshot"][f"docs_{uuid.uuid4().hex[:6]}"]
    for i in range(0, n, 5000):
        coll.insert_many([document(j) for j in range(i, min(n, i + 5000))], ordered=False)
    return coll


def raw_find(coll: Any, n: int, batch_size: int = 1000) -> float:
    """Documents per second of pymongo alone: one ``find()`` in ``_id`` order, decoded to dicts."""
    t0 = time.perf_counter()
    seen = sum(1 for _ in coll.find({}, sort=[("_id", 1)], batch_size=batch_size))
    elapsed = time.perf_counter() - t0
    if seen != n:
        raise RuntimeError(f"the find() loop read {seen} of {n} documents")
    return n / elapsed


def bus_snapshot(coll: Any, n: int, batch_size: int = 1000, workers: int = 1) -> float:
    """Documents per second a bus delivers as snapshot events (from ``start()`` to the last one)."""
    done = threading.Event()
    count = 0
    lock = threading.Lock()
    bus = me.Bus(
        coll,
        resume_token_id=f"bench-{uuid.uuid4().hex[:8]}",
        resume_token_collection=coll.database.client["bench_internal"]["_event_resume_tokens"],
        snapshot="initial",
        snapshot_batch_size=batch_size,
        max_await_time=0.1,
        max_workers=workers,
    )

    @bus.subscribe(operations={"snapshot"})
    def tick(_: me.ChangeEvent) -> None:
        nonlocal count
        with lock:
            count += 1
            if count >= n:
                done.set()

    t0 = time.perf_counter()
    bus.start()
    if not done.wait(600):
        bus.stop()
        raise RuntimeError(f"the snapshot delivered {count} of {n} documents")
    elapsed = time.perf_counter() - t0
    bus.stop()
    return n / elapsed


def run(client: pymongo.MongoClient[Any], quick: bool = False, repeat: int | None = None) -> dict[str, Any]:
    """The snapshot's figures for the benchmark report."""
    n = 3_000 if quick else 20_000
    reps = repeat or (2 if quick else 3)
    coll = load(client, n)
    raw_find(coll, n)  # warm-up
    raws, snaps = [], []
    for _ in range(reps):
        raws.append(raw_find(coll, n))
        snaps.append(bus_snapshot(coll, n))
    each = [s / r for s, r in zip(snaps, raws, strict=True)]
    coll.drop()
    return {
        "snapshot_documents": n,
        "snapshot_raw_find_docs_per_s": round(statistics.median(raws)),
        "snapshot_bus_docs_per_s": round(statistics.median(snaps)),
        "snapshot_ratio": round(statistics.median(each), 3),
        "snapshot_ratio_min": round(min(each), 3),
        "snapshot_ratio_max": round(max(each), 3),
    }


def main() -> int:
    from .run import Server

    server = Server(oplog_size=200_000)
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(server.uri)
    try:
        for key, value in run(client, quick="--quick" in sys.argv).items():
            print(f"{key:<36}{value!s:>14}")
    finally:
        client.close()
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
