"""``python -m benchmarks.groups``: the cost of partitioning, and what the leases cost.

1. One process, one bus in a consumer group, reading the same N pre-loaded changes with
   ``partitions=1`` and ``partitions=4`` (each partition has its own change stream, filtered
   by the server's ``$toHashedIndexKey``, its own window and checkpoint). Repetitions
   alternate; the medians and the median of per-repetition ratios are printed.
2. Scale-out: the same group with ``partitions=4`` run by one process (it holds all four)
   and by two processes (two each). Both members join before the changes are written;
   the time runs from the first write to the last change handled, so it includes the
   writer. On this 2-core machine the fake replica set, the writer and both members share
   the cores: read the ratio as what partitioning costs or gains here, not on a cluster.
3. Lease writes per minute of an idle member holding 1 and 4 partitions, counted (not
   computed) over a few lease renewals: they depend on ``lease_ttl`` and the partitions
   held, never on the event rate.

The fake replica set shares this machine's cores with the bus, so the ratios say more
than the absolute rates.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pymongo

import mongo_events as me
from mongo_events.groups import MongoLeaseStore

from .run import Server, document, preload


@contextmanager
def counted_lease_writes() -> Iterator[list[int]]:
    """Count every lease write (acquire, renew, release) of every MongoLeaseStore meanwhile."""
    count = [0]
    originals = {name: getattr(MongoLeaseStore, name) for name in ("acquire", "renew", "release")}

    def counting(original: Any) -> Any:
        def call(self: MongoLeaseStore, *args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            return original(self, *args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(MongoLeaseStore, name, counting(original))
    try:
        yield count
    finally:
        for name, original in originals.items():
            setattr(MongoLeaseStore, name, original)


def group_run(
    client: pymongo.MongoClient[Any],
    n: int,
    coll: str,
    partitions: int,
    workers: int = 4,
    mode: str = "server",
) -> float:
    """events/s of one group member reading the ``n`` changes of ``coll`` from the past.

    ``mode="client"`` makes the member split on the client, as on a server without ``$toHashedIndexKey``.
    """
    from mongo_events.groups import runtime

    probe = runtime.server_supports_hashed_keys
    if mode == "client":
        runtime.server_supports_hashed_keys = lambda collection: False  # type: ignore[assignment]
    done = threading.Event()
    count = [0]
    lock = threading.Lock()
    bus = me.Bus(
        client["bench"][coll],
        group=f"bench-{uuid.uuid4().hex[:8]}",  # a fresh group: no checkpoint, start from the past
        partitions=partitions,
        lease_ttl=10.0,
        start_from_past=timedelta(hours=1),
        batch_size=1000,
        max_await_time=0.1,
        max_workers=workers,
    )

    @bus.subscribe
    def tick(event: me.ChangeEvent) -> None:
        with lock:
            count[0] += 1
            if count[0] >= n:
                done.set()

    t0 = time.perf_counter()
    try:
        bus.start()
        if not done.wait(600):
            raise RuntimeError(f"the group member delivered {count[0]} of {n}")
        return n / (time.perf_counter() - t0)
    finally:
        bus.stop()
        runtime.server_supports_hashed_keys = probe


def _member(uri: str, coll: str, group: str, partitions: int, hold: int, counted: Any, ready: Any) -> None:
    """A scale-out member process: joins ``group``, says ready once it holds ``hold`` partitions,
    and adds what it handles to the shared ``counted`` (every 100 events, and at the end)."""
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(uri)
    bus = me.Bus(
        client["bench"][coll],
        group=group,
        partitions=partitions,
        lease_ttl=4.0,
        batch_size=1000,
        max_await_time=0.1,
        max_workers=4,
    )
    local = [0]
    lock = threading.Lock()

    @bus.subscribe
    def tick(event: me.ChangeEvent) -> None:
        with lock:
            local[0] += 1
            if local[0] % 100 == 0:
                with counted.get_lock():
                    counted.value += 100

    bus.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = bus.health().group
        if status is not None and len(status.held) == hold:
            break
        threading.Event().wait(0.05)  # a benchmark's poll, not a test's synchronisation
    ready.release()
    threading.Event().wait(600)  # until the coordinator terminates this process


def scale_out_run(uri: str, n: int, processes: int, partitions: int = 4) -> float:
    """events/s of ``processes`` members sharing ``partitions`` partitions, writer included."""
    ctx = multiprocessing.get_context("spawn")  # a fork would copy the threads' locks mid-use
    counted = ctx.Value("q", 0)
    ready = ctx.Semaphore(0)
    coll, group = f"scale_{uuid.uuid4().hex[:8]}", f"scale-{uuid.uuid4().hex[:8]}"
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(uri)
    client["bench"][coll].insert_one({"_id": "first"})  # the collection exists before the members watch it
    members = [
        ctx.Process(
            target=_member, args=(uri, coll, group, partitions, partitions // processes, counted, ready)
        )
        for _ in range(processes)
    ]
    try:
        for m in members:
            m.start()
        for _ in members:
            if not ready.acquire(timeout=90):
                raise RuntimeError("a scale-out member did not take its share in time")
        t0 = time.perf_counter()
        for i in range(0, n, 5000):
            client["bench"][coll].insert_many(
                [document(j) for j in range(i, min(n, i + 5000))], ordered=False
            )
        # Each member reports in hundreds: its last partial hundred is not awaited.
        target = n - 99 * processes
        while counted.value < target:
            if time.perf_counter() - t0 > 600:
                raise RuntimeError(f"scale-out: {counted.value} of {n} handled")
            threading.Event().wait(0.01)
        return counted.value / (time.perf_counter() - t0)
    finally:
        for m in members:
            m.terminate()
            m.join(10)
        client.close()


def lease_writes_per_minute(
    client: pymongo.MongoClient[Any], partitions: int, ttl: float, seconds: float
) -> float:
    """Lease writes per minute of one idle member holding ``partitions`` partitions."""
    bus = me.Bus(
        client["bench"]["idle"], group=f"idle-{uuid.uuid4().hex[:8]}", partitions=partitions, lease_ttl=ttl
    )
    bus.subscribe(lambda event: None)
    bus.start()
    try:
        threading.Event().wait(ttl)  # past the start: only renewals from here
        with counted_lease_writes() as count:
            threading.Event().wait(seconds)
        return count[0] * 60.0 / seconds
    finally:
        bus.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.groups", description=__doc__)
    parser.add_argument("--changes", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--quick", action="store_true", help="2,000 changes, 2 repetitions, short lease counts"
    )
    args = parser.parse_args(argv)
    n, repeat, idle = (2_000, 2, 4.0) if args.quick else (args.changes, args.repeat, 12.0)
    server = Server(oplog_size=max(100_000, 2 * n))
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(server.uri)
    try:
        coll = f"group_{uuid.uuid4().hex[:8]}"
        preload(client, n, coll=coll)
        runs = {
            "1 partition": (1, "server"),
            "4 partitions, server": (4, "server"),
            "4 partitions, client": (4, "client"),
        }
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeat):
            for name, (k, mode) in runs.items():
                rates[name].append(group_run(client, n, coll, k, mode=mode))
        print(f"group workload: {n} changes, {repeat} repetitions, one process, max_workers=4 per partition")
        for name, values in rates.items():
            shown = ", ".join(f"{v:,.0f}" for v in values)
            print(f"  {name}: median {statistics.median(values):,.0f} events/s ({shown})")
        for name in list(runs)[1:]:
            ratios = [a / b for a, b in zip(rates[name], rates["1 partition"], strict=True)]
            print(f"  {name} / 1 partition: median ratio {statistics.median(ratios):.2f}")
        scale: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(repeat):
            for processes in (1, 2):
                scale[processes].append(scale_out_run(server.uri, n, processes))
        for processes, values in scale.items():
            shown = ", ".join(f"{v:,.0f}" for v in values)
            print(
                f"  partitions=4 in {processes} process(es), writer included: median "
                f"{statistics.median(values):,.0f} events/s ({shown})"
            )
        ratios = [a / b for a, b in zip(scale[2], scale[1], strict=True)]
        print(
            f"  2 processes / 1 process: median ratio {statistics.median(ratios):.2f} (2 cores, fake server shares them)"
        )
        ttl = 3.0
        for k in (1, 4):
            measured = lease_writes_per_minute(client, k, ttl, idle)
            expected = (1 + k) * 60.0 / (ttl / 3)
            print(
                f"  lease writes per minute, idle member holding {k} partition(s), lease_ttl={ttl:g}s: "
                f"{measured:.0f} measured, {expected:.0f} expected ((1 + held) x 60 / (lease_ttl / 3)); "
                "none per event"
            )
    finally:
        client.close()
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
