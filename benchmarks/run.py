"""Delivery speed of mongo-events against the raw driver, measured side by side.

The fake replica set runs as its own process (or ``MONGODB_URI`` is used), is
pre-loaded with N changes of about 1 KB, and every workload reads those same
changes from the start of the oplog. Workloads alternate over several
repetitions and the medians are compared, so machine noise hits all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pymongo
from bson.timestamp import Timestamp

import mongo_events as me
from mongo_events.monitor import MongoMonitorStore

from . import queue as queue_bench
from . import regimes
from . import snapshot as snapshot_bench
from .regimes import Run, per_repetition, regime_report, regime_table

#: Changes the ack-store round-trip count reads from the fake (mongomock's upserts bound it; 300 with --quick).
ACKS_ON_FAKE = 20_000
#: Changes the ack and monitor workload reads from the fake: mongomock finds a monitor entry
#: by (event_id, subscription_id) with a scan, so its cost grows with the square of the count.
MONITOR_ON_FAKE = 2_000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTE = "x" * 700


@dataclasses.dataclass
class Item:
    sku: str
    qty: int
    price: float


@dataclasses.dataclass
class Order:
    _id: int
    customer: str
    status: str
    items: list[Item]
    note: str


@dataclasses.dataclass
class OrderChange:
    operation_type: str
    full_document: Order


def document(i: int) -> dict[str, Any]:
    return {
        "_id": i,
        "customer": f"customer-{i % 977}",
        "status": "new",
        "items": [{"sku": f"sku-{j}", "qty": j + 1, "price": 9.5 + j} for j in range(3)],
        "note": NOTE,
    }


class Server:
    """The fake replica set in its own process, or ``MONGODB_URI``."""

    def __init__(self, oplog_size: int) -> None:
        self.proc: subprocess.Popen[str] | None = None
        uri = os.environ.get("MONGODB_URI")
        if uri is None:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mongo_events.testing.server", "--port", "0", "--oplog-size", str(oplog_size)],
                stdout=subprocess.PIPE, text=True, cwd=ROOT,
            )
            assert self.proc.stdout is not None
            uri = self.proc.stdout.readline().strip()
        self.uri = uri

    def counters(self, client: pymongo.MongoClient[Any]) -> dict[str, int]:
        if self.proc is None:
            return {}
        return dict(client.admin.command({"mongoEventsFake": 1})["counters"])

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # a fake holding a million changes can be slow to exit
                self.proc.kill()
                self.proc.wait(10)


def preload(client: pymongo.MongoClient[Any], n: int, coll: str = "orders") -> tuple[Timestamp, Timestamp]:
    db = client["bench"]
    start = db.command("ping")["operationTime"]
    for i in range(0, n, 5000):
        db[coll].insert_many([document(j) for j in range(i, min(n, i + 5000))], ordered=False)
    end = db.command("ping")["operationTime"]
    return Timestamp(start.time, start.inc + 1), end


def raw_loop(client: pymongo.MongoClient[Any], n: int, at: Timestamp) -> float:
    """(a) the ceiling: pymongo alone, decoding to dicts."""
    t0 = time.perf_counter()
    seen = 0
    with client["bench"]["orders"].watch(start_at_operation_time=at, batch_size=1000, max_await_time_ms=100) as stream:
        while seen < n:
            if stream.try_next() is not None:
                seen += 1
    return n / (time.perf_counter() - t0)


class CountingStore(me.IdempotencyStore):
    """Counts calls to an idempotency store: each is one round trip to its server."""

    def __init__(self, inner: me.IdempotencyStore) -> None:
        super().__init__(inner.ttl)
        self.inner = inner
        self.calls = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self.calls += 1

    def try_claim(self, key: str, processing_ttl: timedelta) -> me.Claim:
        self._count()
        claim = self.inner.try_claim(key, processing_ttl)
        if not claim.claimed and isinstance(self.inner, me.MongoIdempotencyStore):
            self._count()  # the MongoDB store reads the document to say why
        return claim

    def complete(self, key: str) -> None:
        self._count()
        self.inner.complete(key)

    def release(self, key: str) -> None:
        self._count()
        self.inner.release(key)

    def remove(self, key: str) -> None:
        self._count()
        self.inner.remove(key)

    def ensure_indexes(self) -> None:
        self.inner.ensure_indexes()


class RedisServer:
    """``REDIS_URL``, or a ``redis-server`` on a free loopback port, or nothing (``url`` is None)."""

    def __init__(self) -> None:
        import shutil
        import socket

        self.proc: subprocess.Popen[bytes] | None = None
        self.url = os.environ.get("REDIS_URL")
        binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
        if self.url or binary is None:
            return
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer within 10 s") from None
                threading.Event().wait(0.05)
        client.close()
        self.url = f"redis://127.0.0.1:{port}/0"

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def bus_run(
    client: pymongo.MongoClient[Any],
    n: int,
    at: Timestamp,
    *,
    typed: bool = False,
    workers: int = 1,
    acks: bool = False,
    monitor: bool = True,
    idempotency: me.IdempotencyStore | None = None,
) -> tuple[float, me.Bus]:
    """(b)-(e): a bus reading the same changes; returns events/s and the stopped bus."""
    done = threading.Event()
    count = [0]
    lock = threading.Lock()
    bus = me.Bus(
        client["bench"]["orders"],
        resume_token_id=f"bench-{uuid.uuid4().hex[:8]}",
        resume_token_collection=client["bench_internal"]["_event_resume_tokens"],
        start_from_past=timedelta(hours=1),
        batch_size=1000,
        max_await_time=0.1,
        max_workers=workers,
        ack_store=me.MongoAckStore(client["bench_internal"]["_event_acks"]) if acks else None,
        monitor=MongoMonitorStore(client["bench_internal"], collection=f"monitor_{uuid.uuid4().hex[:8]}") if acks and monitor else None,
        idempotency=idempotency,
    )

    def tick(_: Any) -> None:
        with lock:
            count[0] += 1
            if count[0] >= n:
                done.set()

    if typed:
        bus.subscribe(payload=OrderChange)(tick)
    else:
        bus.subscribe(tick)
    # start_from_past begins at a time: skip to the pre-loaded changes exactly.
    bus.start_from_past = None
    original = bus._initial_position
    bus._initial_position = lambda: me.watcher.Position(start_at_operation_time=at) if original().kwargs() == {} else original()  # type: ignore[method-assign]
    t0 = time.perf_counter()
    bus.start()
    if not done.wait(600):
        raise RuntimeError(f"bus delivered {count[0]} of {n}")
    elapsed = time.perf_counter() - t0
    bus.stop()
    return n / elapsed, bus


def idempotency_run(client: pymongo.MongoClient[Any], n: int, at: Timestamp, store: me.IdempotencyStore, workers: int = 8) -> tuple[float, float]:
    """A bus with ``idempotency=store`` over n fresh events; returns (events/s, store round trips per event)."""
    counting = CountingStore(store)
    rate, _ = bus_run(client, n, at, workers=workers, idempotency=counting)
    return rate, counting.calls / n


def mongo_idempotency_store(client: pymongo.MongoClient[Any]) -> me.IdempotencyStore:
    return me.MongoIdempotencyStore(client["bench_internal"][f"idempotency_{uuid.uuid4().hex[:8]}"])


def redis_idempotency_store(url: str) -> me.IdempotencyStore:
    import redis

    return me.RedisIdempotencyStore(redis.Redis.from_url(url), prefix=f"bench-{uuid.uuid4().hex[:8]}:")


def latency(client: pymongo.MongoClient[Any], rate: int, seconds: float) -> tuple[float, float]:
    """Added latency from try_next() returning an event to the callback starting, at ``rate``/s."""
    samples: list[float] = []
    got = threading.Event()
    total = int(rate * seconds)

    # The stream consumer opens the stream (mongo_events.consumer); time each try_next() there.
    from mongo_events.consumer import StreamConsumer

    open_stream = StreamConsumer._open_stream

    def timed_open(consumer: StreamConsumer, position: Any) -> Any:
        stream = open_stream(consumer, position)
        inner = stream.try_next

        def try_next() -> Any:
            doc = inner()
            if doc is not None:
                doc["_bench_t"] = time.perf_counter()
            return doc

        stream.try_next = try_next  # type: ignore[method-assign]
        return stream

    bus = me.Bus(client["bench"]["latency"], resume=False, max_await_time=0.05, max_workers=8)

    @bus.subscribe
    def on(event: me.ChangeEvent) -> None:
        samples.append(time.perf_counter() - event.raw["_bench_t"])
        if len(samples) >= total:
            got.set()

    StreamConsumer._open_stream = timed_open  # type: ignore[method-assign,assignment]
    try:
        bus.start()
    finally:
        StreamConsumer._open_stream = open_stream  # type: ignore[method-assign]
    pace = threading.Event()
    interval = 1.0 / rate
    next_at = time.perf_counter()
    for i in range(total):
        client["bench"]["latency"].insert_one(document(i))
        next_at += interval
        pace.wait(max(0.0, next_at - time.perf_counter()))
    got.wait(30)
    bus.stop()
    samples.sort()
    return samples[len(samples) // 2] * 1000, samples[int(len(samples) * 0.99)] * 1000


def rss_growth(uri: str, changes: int) -> tuple[float, int]:
    """Peak RSS growth (MB) of a bus whose first callback blocks while ``changes`` wait."""
    code = f"""
import resource, threading, pymongo, mongo_events as me
from datetime import timedelta
def status(field):  # kB from /proc/self/status, else the peak from getrusage
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
c = pymongo.MongoClient({uri!r})
c.admin.command("ping")
try:  # reset the peak (VmHWM) to the current RSS, so the peak below is this run's own
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = status("VmRSS")
release = threading.Event(); held = threading.Event()
bus = me.Bus(c["bench"]["burst"], resume=False, start_from_past=timedelta(hours=1), batch_size=1000, max_await_time=0.1)
@bus.subscribe
def slow(ev):
    if ev.document_id == 0:
        held.set(); release.wait(120)
bus.start()
held.wait(60)
import time
deadline = time.monotonic() + 5
while time.monotonic() < deadline and bus.in_flight < bus.max_in_flight:
    threading.Event().wait(0.05)
threading.Event().wait(2)
print(bus.in_flight, (status("VmHWM") - base) / 1024)
release.set(); bus.stop(timeout=5)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the burst run failed:\n{proc.stderr[-3000:]}")
    out = proc.stdout.split()
    return float(out[1]), int(out[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a run of about a minute")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("--changes", type=int, help="changes per workload (default 200,000; --quick 15,000)")
    parser.add_argument("--repeat", type=int, help="repetitions per workload (default 3; --quick 2)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    n = args.changes or (15_000 if args.quick else 200_000)
    reps = args.repeat or (2 if args.quick else 3)
    n_slow = 6_000 if args.quick else 40_000
    n_slow_acks = 2_000 if args.quick else 40_000  # the ack store's upserts bound it on the fake
    n_compare = 2_000 if args.quick else 10_000
    n_per_write = 500 if args.quick else n_compare  # one write per event: about 1,300/s on the fake
    n_redis = min(n, 5_000 if args.quick else 20_000)  # two Redis round trips per event bound it
    burst = 20_000 if args.quick else 1_000_000
    acks_on_fake = 300 if args.quick else ACKS_ON_FAKE
    # Every write is an oplog entry, the ack and monitor upserts included (about four
    # per event): the burst must still be in the oplog when its bus starts.
    server = Server(oplog_size=n + burst + 4 * acks_on_fake * (reps + 1) + 100_000)
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(server.uri)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    try:
        log(f"pre-loading {n} changes of about 1 KB ...")
        at, _ = preload(client, n)
        # The fake writes through mongomock at about 1,000 upserts/s, so the ack and monitor
        # workload (two or three upserts per event) measures the fake, not the bus: on the
        # fake it reads fewer changes. A real server (MONGODB_URI) reads them all.
        n_acks = n if server.proc is None else min(n, acks_on_fake)
        n_monitor = n if server.proc is None else min(n_acks, MONITOR_ON_FAKE)
        raw_loop(client, n, at)  # warm-up: the fake encodes each change once, on first read
        workloads: dict[str, Callable[[], float | Run]] = {
            "raw": lambda: raw_loop(client, n, at),
            "bus_noop": lambda: bus_run(client, n, at)[0],
            "bus_typed": lambda: bus_run(client, n, at, typed=True)[0],
            "bus_8_workers": lambda: bus_run(client, n, at, workers=8)[0],
            "bus_8_workers_acks_monitor": lambda: bus_run(client, n_monitor, at, workers=8, acks=True)[0],
        }
        pairs = {name: "raw" for name in workloads if name != "raw"}
        extra, extra_pairs = regimes.regime_workloads(
            client, n, at, n_slow=n_slow, n_acks=n_slow_acks, n_compare=n_compare, n_per_write=n_per_write
        )
        workloads.update(extra)
        pairs.update(extra_pairs)
        runs: dict[str, list[Run]] = {k: [] for k in workloads}
        for rep in range(reps):
            for name, fn in workloads.items():
                t0 = time.perf_counter()
                result = fn()
                runs[name].append(result if isinstance(result, Run) else Run(result, n))
                log(f"  rep {rep + 1} {name:<32} {runs[name][-1].events_per_s:>10,.0f} events/s  ({time.perf_counter() - t0:.1f} s)")
        results = {k: [r.events_per_s for r in v] for k, v in runs.items()}
        med = {k: statistics.median(v) for k, v in results.items()}
        # Each ratio is the median of per-repetition ratios (both runs from the same
        # repetition), with its min and max: a ratio of medians can pair a fast bus run
        # with a slow raw run of another repetition.
        ratios = {name: per_repetition(results[name], results[pair]) for name, pair in pairs.items()}
        ratios.update({key: per_repetition(results[bus], results[hand]) for key, (bus, hand) in regimes.COMPARISONS.items()})
        if med["raw"] < 50_000:
            log(
                f"WARNING: the raw pymongo loop reached only {med['raw']:,.0f} events/s (< 50,000): the ceiling "
                "itself is low here (the server, or this machine's decoding); the ratios below are given but may flatter"
            )
        # Round trips: a bus with an ack store (no monitor, whose writes are not checkpoint
        # or ack writes), counted by the bus and, on the fake, by the server's write commands.
        before = server.counters(client)
        _, bus = bus_run(client, n_acks, at, workers=8, acks=True, monitor=False)
        after = server.counters(client)
        round_trips = (bus.token_writes + bus.ack_writes) / n_acks * 1000
        writes = sum(after.get(c, 0) - before.get(c, 0) for c in ("insert", "update", "delete", "findAndModify"))
        p50, p99 = latency(client, rate=1000, seconds=3 if args.quick else 10)
        # Idempotency: fresh keys each run (a new collection or prefix), so every event claims
        # and completes. The MongoDB store writes through the fake's mongomock (about 1,000
        # upserts/s), so it reads as many changes as the ack workload.
        idem_mongo, trips_mongo = idempotency_run(client, n_acks, at, mongo_idempotency_store(client))
        log(f"  ({time.perf_counter() - started:.0f} s so far) idempotency (MongoDB) {idem_mongo:>10,.0f} events/s, {trips_mongo:.2f} store round trips per event")
        redis_server = RedisServer()
        idem_redis = trips_redis = None
        try:
            if redis_server.url is not None:
                idem_redis, trips_redis = idempotency_run(client, n_redis, at, redis_idempotency_store(redis_server.url))
                log(f"  idempotency (Redis)   {idem_redis:>10,.0f} events/s, {trips_redis:.2f} store round trips per event")
            else:
                log("  idempotency (Redis): no REDIS_URL and no redis-server binary; not measured")
            queue_figures = queue_bench.run(client, redis_server.url, quick=args.quick)  # benchmarks/queue.py
            log(f"  ({time.perf_counter() - started:.0f} s so far) queue: " + ", ".join(f"{k} {v}" for k, v in queue_figures.items()))
        finally:
            redis_server.close()
        snapshot_figures = snapshot_bench.run(client, quick=args.quick, repeat=args.repeat)  # benchmarks/snapshot.py
        log(f"  ({time.perf_counter() - started:.0f} s so far) snapshot: " + ", ".join(f"{k} {v}" for k, v in snapshot_figures.items()))
        # Last: a million pre-loaded changes make the fake slower at everything after them.
        log(f"pre-loading a burst of {burst} changes ({time.perf_counter() - started:.0f} s so far) ...")
        for i in range(0, burst, 10_000):
            client["bench"]["burst"].insert_many([document(j) for j in range(i, i + 10_000)], ordered=False)
        rss, held = rss_growth(server.uri, burst)
        report = {
            "changes": n,
            "repetitions": reps,
            "raw_events_per_s": round(med["raw"]),
            "bus_noop_events_per_s": round(med["bus_noop"]),
            "bus_typed_events_per_s": round(med["bus_typed"]),
            "bus_8_workers_events_per_s": round(med["bus_8_workers"]),
            "bus_8_workers_acks_monitor_events_per_s": round(med["bus_8_workers_acks_monitor"]),
            "acks_monitor_changes": n_monitor,
            "round_trip_changes": n_acks,
            "token_writes": bus.token_writes,
            "ack_writes": bus.ack_writes,
            "ratio_noop": ratios["bus_noop"][0],
            "ratio_noop_min": ratios["bus_noop"][1],
            "ratio_noop_max": ratios["bus_noop"][2],
            "ratio_typed": ratios["bus_typed"][0],
            "ratio_typed_min": ratios["bus_typed"][1],
            "ratio_typed_max": ratios["bus_typed"][2],
            "store_round_trips_per_1000": round(round_trips, 3),
            "token_round_trips_per_10000": round(bus.token_writes / n_acks * 10_000, 1),
            "ack_round_trips_per_10000": round(bus.ack_writes / n_acks * 10_000, 1),
            "server_write_commands_per_1000": round(writes / n_acks * 1000, 3) if server.proc is not None else None,
            "p50_added_latency_ms": round(p50, 3),
            "p99_added_latency_ms": round(p99, 3),
            "rss_growth_mb": round(rss, 1),
            "burst_changes": burst,
            "burst_in_flight": held,
            "idempotency_mongo_events_per_s": round(idem_mongo),
            "idempotency_mongo_round_trips_per_event": round(trips_mongo, 3),
            "idempotency_redis_events_per_s": round(idem_redis) if idem_redis is not None else None,
            "idempotency_redis_round_trips_per_event": round(trips_redis, 3) if trips_redis is not None else None,
            "load_average_1m": round(os.getloadavg()[0], 2),
        }
        report.update(regime_report(runs, ratios, med))
        report.update(queue_figures)
        report.update(snapshot_figures)
        log("")
        log(f"{'measure':<48}{'value':>14}")
        for key, value in report.items():
            log(f"{key:<48}{value!s:>14}")
        log("")
        for line in regime_table(runs, ratios, med, pairs):
            log(line)
        log(f"\nthe benchmark took {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f}")
        if args.json:
            print(json.dumps(report))
    finally:
        client.close()
        server.close()
    return 0


