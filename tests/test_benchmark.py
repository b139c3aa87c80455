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
