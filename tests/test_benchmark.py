"""The benchmark's workloads run and count what they claim (speed is not asserted here)."""

from __future__ import annotations

from typing import Any

import pymongo

from benchmarks import run


def test_workloads_read_every_preloaded_change(client: pymongo.MongoClient[Any]) -> None:
    at, end = run.preload(client, 300)
    assert end.time >= at.time
    assert run.raw_loop(client, 300, at) > 0
    rate, bus = run.bus_run(client, 300, at, typed=True, workers=2, acks=True)
    assert rate > 0
    assert bus.ack_writes >= 1 and bus.token_writes >= 1  # (e) wrote acks and checkpoints
    assert client["bench_internal"]["_event_acks"].count_documents({}) == 300


def test_idempotency_workloads_claim_and_complete_each_event_once(
    client: pymongo.MongoClient[Any], redis_url: str
) -> None:
    at, _ = run.preload(client, 200)
    rate, trips = run.idempotency_run(client, 200, at, run.mongo_idempotency_store(client), workers=4)
    assert rate > 0
    assert trips == 2.0  # one claim and one complete per event: no batching yet
    rate, trips = run.idempotency_run(client, 200, at, run.redis_idempotency_store(redis_url), workers=4)
    assert rate > 0 and trips == 2.0


def test_the_latency_workload_times_every_event(client: pymongo.MongoClient[Any]) -> None:
    # It times try_next() inside the stream consumer; if that seam moves, no event is timed.
    p50, p99 = run.latency(client, rate=200, seconds=0.5)
    assert 0 < p50 <= p99
