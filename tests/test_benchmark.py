"""The benchmark's workloads run and count what they claim (speed is not asserted here)."""

from __future__ import annotations

import statistics
from typing import Any

import pymongo

from benchmarks import regimes, run


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


def test_ratios_are_medians_of_per_repetition_ratios() -> None:
    # The ratio of medians here would be 40/100 = 0.4; the per-repetition ratios are 0.5, 0.2, 0.8.
    assert regimes.per_repetition([50.0, 40.0, 40.0], [100.0, 200.0, 50.0]) == (0.5, 0.2, 0.8)


def test_regime_workloads_count_what_they_claim(client: pymongo.MongoClient[Any]) -> None:
    at, _ = run.preload(client, 300)
    fan = regimes.bus_workload(client, 300, at, subscriptions=3, batch_size=101)
    assert fan.events == 300 and fan.events_per_s > 0
    assert fan.checkpoint_writes is not None and fan.ack_writes is None
    slow = regimes.bus_workload(client, 300, at, workers=4, handler_s=0.0001, acks=True)
    assert slow.events == 300 and slow.ack_writes is not None  # counted (0 or more while delivering)
    assert client["bench_internal"]["_event_acks"].count_documents({}) == 300  # and written by stop()
    per_event = regimes.hand_rolled_loop(client, 300, at, save_every=1)
    assert per_event.checkpoint_writes == 300
    every_100 = regimes.hand_rolled_loop(client, 250, at, save_every=100)
    assert every_100.checkpoint_writes == 3  # at 100, 200 and the last
    handled: list[Any] = []
    pool = regimes.hand_rolled_pool(client, 300, at, workers=4, handler=handled.append)
    assert pool.checkpoint_writes == 300 and len(handled) == 300
    assert regimes.raw_batch(client, 300, at, 101) > 0


def test_report_and_table_name_every_workload() -> None:
    def runs_of(rate: float, writes: int | None = None, acks: int | None = None) -> list[regimes.Run]:
        return [regimes.Run(rate, 1000, writes, acks), regimes.Run(rate * 2, 1000, writes, acks)]

    names = ["raw", "bus_noop", "slow_1ms_8_workers", "raw_batch_101", "raw_batch_5000"]
    names += [bus for bus, _ in regimes.COMPARISONS.values()] + [
        hand for _, hand in regimes.COMPARISONS.values()
    ]
    runs = {name: runs_of(100.0) for name in dict.fromkeys(names)}
    runs["slow_1ms_8_workers"] = runs_of(4000.0, writes=5, acks=2)
    pairs = {name: "raw" for name in runs if name != "raw"}
    ratios = {
        name: regimes.per_repetition(
            [r.events_per_s for r in runs[name]], [r.events_per_s for r in runs[pair]]
        )
        for name, pair in pairs.items()
    }
    ratios.update({key: (1.0, 1.0, 1.0) for key in regimes.COMPARISONS})
    med = {name: statistics.median(r.events_per_s for r in rs) for name, rs in runs.items()}
    report = regimes.regime_report(runs, ratios, med)
    assert report["slow_1ms_8_workers_ratio"] == 40.0
    assert report["slow_1ms_8_workers_checkpoint_writes_per_1000"] == 5.0
    assert report["slow_1ms_8_workers_ack_writes_per_1000"] == 2.0
    assert report["slow_1ms_8_workers_efficiency"] == 0.75  # median of 4,000 and 8,000 against 8,000
    assert report["vs_token_per_event_ratio"] == 1.0
    table = "\n".join(regimes.regime_table(runs, ratios, med, pairs))
    assert all(name in table for name in runs) and "vs_pool_token_after_submit" in table


def test_the_latency_workload_times_every_event(client: pymongo.MongoClient[Any]) -> None:
    # It times try_next() inside the stream consumer; if that seam moves, no event is timed.
    p50, p99 = run.latency(client, rate=200, seconds=0.5)
    assert 0 < p50 <= p99


def test_snapshot_workloads_read_every_document(client: pymongo.MongoClient[Any]) -> None:
    from benchmarks import snapshot

    coll = snapshot.load(client, 300)
    assert coll.count_documents({}) == 300
    assert snapshot.raw_find(coll, 300) > 0
    assert snapshot.bus_snapshot(coll, 300, batch_size=64) > 0  # it waits for all 300 snapshot events
    figures = snapshot.run(client, quick=True, repeat=1)
    assert figures["snapshot_documents"] == 3000 and figures["snapshot_ratio"] > 0
