"""The group benchmark's workloads count what they claim (speed is not asserted here)."""

from __future__ import annotations

from typing import Any

import pymongo

import mongo_events as me
from benchmarks import groups, run


def test_group_workloads_read_every_change_in_each_mode(client: pymongo.MongoClient[Any]) -> None:
    run.preload(client, 200, coll="group_bench")
    for partitions, mode in ((1, "server"), (4, "server"), (4, "client")):
        assert groups.group_run(client, 200, "group_bench", partitions, mode=mode) > 0


def test_lease_writes_are_counted_per_store_call(client: pymongo.MongoClient[Any]) -> None:
    with groups.counted_lease_writes() as count:
        bus = me.Bus(client.bench.idle, group="count", partitions=2, lease_ttl=30.0)
        bus.subscribe(lambda event: None)
        bus.start()  # one heartbeat and two partitions taken
        taken = count[0]
        bus.stop()  # two partitions and the heartbeat released
    assert (taken, count[0]) == (3, 6)


def test_the_scale_out_workload_counts_what_two_members_handle(fake_rs: Any) -> None:
    assert groups.scale_out_run(fake_rs.uri, 1000, processes=2) > 0
