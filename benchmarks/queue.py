"""The durable queue: publish-to-callback latency with the Redis signal against polling only,
and the throughput of one consumer draining a backlog.

``python -m benchmarks`` runs it (see :func:`run`); ``python -m benchmarks.queue`` runs it alone.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import uuid
from typing import Any

import pymongo

from mongo_events.queue import Queue, RedisSignal


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency(
    coll: Any, redis_url: str | None, n: int = 200, poll_interval: float = 0.1, gap: float = 0.01
) -> tuple[float, float]:
    """p50 and p99 (ms) from ``publish()`` to the callback, one message every ``gap`` seconds.

    With ``redis_url`` the consumer polls every 5 s (Go's default) and waits for the
    signal; without it, it polls every ``poll_interval`` (Go's poll transport: 100 ms).
    The publisher is a separate :class:`Queue` object, so only Redis (or the poll) wakes
    the consumer.
    """
    event = f"bench.{uuid.uuid4().hex[:8]}"
    prefix = f"_sig:{uuid.uuid4().hex[:6]}:"
    samples: list[float] = []
    done = threading.Event()

    def on(payload: dict[str, Any]) -> None:
        samples.append((time.perf_counter() - payload["t"]) * 1000)
        if len(samples) >= n:
            done.set()

    signal = RedisSignal(redis_url, prefix=prefix) if redis_url else None
    consumer = Queue(
        coll,
        signal=signal,
        poll_interval=5.0 if signal else poll_interval,
        max_workers=4,
        name="bench-consumer",
    )
    consumer.subscribe(on, event=event)
    publisher = Queue(coll, signal=RedisSignal(redis_url, prefix=prefix) if redis_url else None)
    pace = threading.Event()
    with consumer:
        deadline = time.monotonic() + 10
        while signal is not None and not signal.healthy and time.monotonic() < deadline:
            pace.wait(0.01)
        for _ in range(n):
            publisher.publish(event, {"t": time.perf_counter()})
            pace.wait(gap)
        done.wait(60)
    return statistics.median(samples), _percentile(samples, 0.99)


def throughput(coll: Any, n: int = 2000, workers: int = 8) -> float:
    """Messages per second one consumer handles (claim, callback, ack) from a backlog of ``n``."""
    event = f"bench.{uuid.uuid4().hex[:8]}"
    publisher = Queue(coll)
    for i in range(0, n, 500):
        publisher.publish_many([(event, {"n": j}) for j in range(i, min(n, i + 500))])
    count = 0
    lock = threading.Lock()
    done = threading.Event()

    def on(payload: dict[str, Any]) -> None:
        nonlocal count
        with lock:
            count += 1
            if count >= n:
                done.set()

    consumer = Queue(coll, poll_interval=0.05, max_workers=workers, prefetch=4 * workers)
    consumer.subscribe(on, event=event)
    start = time.perf_counter()
    with consumer:
        done.wait(300)
        elapsed = time.perf_counter() - start
    return count / elapsed


def run(client: pymongo.MongoClient[Any], redis_url: str | None, quick: bool = False) -> dict[str, Any]:
    """The queue's figures for the benchmark report."""
    coll = client["bench_queue"][f"messages_{uuid.uuid4().hex[:6]}"]
    n = 100 if quick else 300
    out: dict[str, Any] = {}
    if redis_url:
        p50, p99 = latency(coll, redis_url, n)
        out["queue_signal_p50_ms"], out["queue_signal_p99_ms"] = round(p50, 2), round(p99, 2)
    else:
        out["queue_signal_p50_ms"] = out["queue_signal_p99_ms"] = None
    p50, p99 = latency(coll, None, n)
    out["queue_poll_100ms_p50_ms"], out["queue_poll_100ms_p99_ms"] = round(p50, 2), round(p99, 2)
    out["queue_messages_per_s"] = round(throughput(coll, 400 if quick else 3000))  # the fake: about 230/s
    return out


def main() -> int:
    from .run import RedisServer, Server

    server = Server(oplog_size=200_000)
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(server.uri)
    redis_server = RedisServer()
    try:
        for key, value in run(client, redis_server.url, quick="--quick" in sys.argv).items():
            print(f"{key:<36}{value!s:>14}")
    finally:
        redis_server.close()
        client.close()
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
