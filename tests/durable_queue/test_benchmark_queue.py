"""The queue benchmark's workloads run and measure what they claim (speed is not asserted)."""

from __future__ import annotations

from typing import Any

import pymongo

from benchmarks import queue as queue_bench


def test_latency_with_and_without_signal_sees_every_message(
    client: pymongo.MongoClient[Any], redis_url: str
) -> None:
    coll = client.bench_queue.messages
    for url in (redis_url, None):
        p50, p99 = queue_bench.latency(coll, url, n=20, gap=0.001)
        assert 0 < p50 <= p99
    assert coll.count_documents({"status": "acked"}) == 40


def test_throughput_drains_the_backlog(client: pymongo.MongoClient[Any]) -> None:
    coll = client.bench_queue.messages
    assert queue_bench.throughput(coll, n=100, workers=2) > 0
    assert coll.count_documents({"status": "acked"}) == 100
