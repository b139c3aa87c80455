"""Workloads beyond the fast path: slow handlers, fan-out, batch sizes, and hand-rolled consumers.

Each bus workload returns a :class:`Run`: its events/s and the checkpoint and
ack writes the bus made while it delivered (counted when the last event was
delivered, so the final write at ``stop()`` is left out). The hand-rolled
consumers are what a user would write instead of the bus; they read the same
changes with the same callback and save their resume token to the same kind of
collection, so ``bus / hand-rolled`` compares like with like.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from typing import Any

import pymongo
from bson.timestamp import Timestamp

import mongo_events as me

#: The slow handler's cost: a callback that waits 1 ms (an HTTP call, a write elsewhere).
SLOW_HANDLER_S = 0.001


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of one workload."""

    events_per_s: float
    events: int
    #: Checkpoint writes while delivering (None for a consumer that stores nothing).
    checkpoint_writes: int | None = None
    ack_writes: int | None = None

    def per_1000(self, writes: int | None) -> float | None:
        return None if writes is None else writes / self.events * 1000


def slow_handler(_: Any) -> None:
    time.sleep(SLOW_HANDLER_S)  # the handler's own work, not synchronisation


def bus_workload(
    client: pymongo.MongoClient[Any],
    n: int,
    at: Timestamp,
    *,
    workers: int = 1,
    handler_s: float = 0.0,
    subscriptions: int = 1,
    batch_size: int = 1000,
    acks: bool = False,
) -> Run:
    """A bus reading the ``n`` pre-loaded changes from ``at`` with ``subscriptions`` callbacks.

    Each callback waits ``handler_s`` seconds (0: a no-op). The run ends when every
    subscription has seen every change. The callbacks count on one ``itertools.count``
    (``next()`` on it is atomic in CPython), not under a lock: a ``threading.Lock`` costs
    1 to 1.5 µs a use on the 2-core benchmark machine, so sixteen no-op subscriptions
    counting under a lock spent more per event on that lock than the raw loop spends on
    the whole event, and the fan-out workloads measured the lock.
    """
    done = threading.Event()
    counter = itertools.count(1)
    target = n * subscriptions
    writes: list[int] = []
    bus = me.Bus(
        client["bench"]["orders"],
        resume_token_id=f"bench-{uuid.uuid4().hex[:8]}",
        resume_token_collection=client["bench_internal"]["_event_resume_tokens"],
        start_from_past=timedelta(hours=1),
        batch_size=batch_size,
        max_await_time=0.1,
        max_workers=workers,
        ack_store=me.MongoAckStore(client["bench_internal"]["_event_acks"]) if acks else None,
    )

    def tick(_: Any) -> None:
        if handler_s:
            time.sleep(handler_s)  # the handler's own work, not synchronisation
        if next(counter) == target:  # each value is handed out once: one callback sees the target
            writes[:] = [bus.token_writes, bus.ack_writes]
            done.set()

    for i in range(subscriptions):
        bus.subscribe(name=f"sub-{i}")(tick)
    _start_at(bus, at)
    t0 = time.perf_counter()
    bus.start()
    try:
        if not done.wait(600):
            raise RuntimeError(f"bus delivered fewer than {target} ({counter!r} is the next count)")
        elapsed = time.perf_counter() - t0
    finally:
        bus.stop()
    return Run(n / elapsed, n, writes[0], writes[1] if acks else None)


def _start_at(bus: me.Bus, at: Timestamp) -> None:
    # start_from_past begins at a time: skip to the pre-loaded changes exactly.
    bus.start_from_past = None
    original = bus._initial_position

    def initial_position() -> me.watcher.Position:
        position = original()
        return me.watcher.Position(start_at_operation_time=at) if position.kwargs() == {} else position

    bus._initial_position = initial_position  # type: ignore[method-assign]


def _token_store(client: pymongo.MongoClient[Any]) -> tuple[pymongo.collection.Collection[Any], str]:
    return client["bench_internal"]["handrolled_tokens"], f"hand-{uuid.uuid4().hex[:8]}"


def hand_rolled_loop(
    client: pymongo.MongoClient[Any],
    n: int,
    at: Timestamp,
    *,
    save_every: int = 1,
    handler: Callable[[Any], None] = lambda _: None,
) -> Run:
    """What a user writes without the bus: handle each change, then save the token every ``save_every`` changes."""
    tokens, key = _token_store(client)
    saves = 0
    seen = 0
    t0 = time.perf_counter()
    with client["bench"]["orders"].watch(
        start_at_operation_time=at, batch_size=1000, max_await_time_ms=100
    ) as stream:
        while seen < n:
            change = stream.try_next()
            if change is None:
                continue
            handler(change)
            seen += 1
            if seen % save_every == 0 or seen == n:
                tokens.update_one({"_id": key}, {"$set": {"token": stream.resume_token}}, upsert=True)
                saves += 1
    return Run(n / (time.perf_counter() - t0), n, saves)


def hand_rolled_pool(
    client: pymongo.MongoClient[Any],
    n: int,
    at: Timestamp,
    *,
    workers: int = 8,
    handler: Callable[[Any], None] = slow_handler,
) -> Run:
    """A thread pool fed by the stream, the token saved right after each submit.

    The usual hand-rolled concurrent consumer. It is not at-least-once: the token is
    saved before the handler ran, so a crash loses the changes still queued, and the
    queue is unbounded. It is here for its speed only.
    """
    tokens, key = _token_store(client)
    done = threading.Event()
    count = [0]
    lock = threading.Lock()

    def run(change: Any) -> None:
        handler(change)
        with lock:
            count[0] += 1
            if count[0] >= n:
                done.set()

    saves = 0
    seen = 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        with client["bench"]["orders"].watch(
            start_at_operation_time=at, batch_size=1000, max_await_time_ms=100
        ) as stream:
            while seen < n:
                change = stream.try_next()
                if change is None:
                    continue
                pool.submit(run, change)
                seen += 1
                tokens.update_one({"_id": key}, {"$set": {"token": stream.resume_token}}, upsert=True)
                saves += 1
        if not done.wait(600):
            raise RuntimeError(f"the pool handled {count[0]} of {n}")
        elapsed = time.perf_counter() - t0
    return Run(n / elapsed, n, saves)


#: Worker counts of the slow-handler workloads; their ideal rate is ``workers / SLOW_HANDLER_S``.
SLOW_WORKERS = (8, 32)
#: Subscriptions of the fan-out workloads (1 is ``bus_noop`` but for how its callback counts).
FAN_OUT = (1, 4, 16)
#: Batch sizes of the sweep (1,000 is ``raw`` and ``bus_noop``).
BATCH_SIZES = (101, 5000)


def regime_workloads(
    client: pymongo.MongoClient[Any],
    n: int,
    at: Timestamp,
    *,
    n_slow: int,
    n_acks: int,
    n_compare: int,
    n_per_write: int | None = None,
) -> tuple[dict[str, Callable[[], Run]], dict[str, str]]:
    """The workloads of this module, and for each the workload its ratio divides by.

    ``n`` changes for the fast ones, ``n_slow`` for the slow-handler ones (``n_acks``
    of them with an ack store), ``n_compare`` for the hand-rolled comparison, whose
    ratios are bus / hand-rolled (each pair runs in the same repetition). The two
    hand-rolled consumers that write once per event read ``n_per_write`` (default
    ``n_compare``): their rate is one write's round trip, steady from the first event.
    """
    n_per_write = n_compare if n_per_write is None else n_per_write
    workloads: dict[str, Callable[[], Run]] = {}
    pairs: dict[str, str] = {}

    def add(name: str, fn: Callable[[], Run], pair: str) -> None:
        workloads[name] = fn
        pairs[name] = pair

    for workers in SLOW_WORKERS:
        add(
            f"slow_1ms_{workers}_workers",
            partial(bus_workload, client, n_slow, at, workers=workers, handler_s=SLOW_HANDLER_S),
            "raw",
        )
    add(
        "slow_1ms_8_workers_acks",
        lambda: bus_workload(client, n_acks, at, workers=8, handler_s=SLOW_HANDLER_S, acks=True),
        "raw",
    )
    for subs in FAN_OUT:
        add(f"subscriptions_{subs}", partial(bus_workload, client, n, at, subscriptions=subs), "raw")
    for size in BATCH_SIZES:
        add(f"raw_batch_{size}", partial(raw_batch_run, client, n, at, size), "raw")
        add(f"bus_batch_{size}", partial(bus_workload, client, n, at, batch_size=size), f"raw_batch_{size}")
    # The comparison: each hand-rolled consumer, then the bus doing the same work.
    add("hand_token_per_event", lambda: hand_rolled_loop(client, n_per_write, at, save_every=1), "raw")
    add("hand_token_every_100", lambda: hand_rolled_loop(client, n_compare, at, save_every=100), "raw")
    add("bus_compare_noop", lambda: bus_workload(client, n_compare, at), "raw")
    add("hand_pool_8_token_after_submit", lambda: hand_rolled_pool(client, n_per_write, at, workers=8), "raw")
    add(
        "bus_compare_slow_1ms_8_workers",
        lambda: bus_workload(client, n_compare, at, workers=8, handler_s=SLOW_HANDLER_S),
        "raw",
    )
    return workloads, pairs


#: bus workload / hand-rolled workload: the comparison's ratios (above 1: the bus is faster).
COMPARISONS = {
    "vs_token_per_event": ("bus_compare_noop", "hand_token_per_event"),
    "vs_token_every_100": ("bus_compare_noop", "hand_token_every_100"),
    "vs_pool_token_after_submit": ("bus_compare_slow_1ms_8_workers", "hand_pool_8_token_after_submit"),
}


def raw_batch_run(client: pymongo.MongoClient[Any], n: int, at: Timestamp, batch_size: int) -> Run:
    return Run(raw_batch(client, n, at, batch_size), n)


def raw_batch(client: pymongo.MongoClient[Any], n: int, at: Timestamp, batch_size: int) -> float:
    """The raw pymongo loop at another batch size."""
    t0 = time.perf_counter()
    seen = 0
    with client["bench"]["orders"].watch(
        start_at_operation_time=at, batch_size=batch_size, max_await_time_ms=100
    ) as stream:
        while seen < n:
            if stream.try_next() is not None:
                seen += 1
    return n / (time.perf_counter() - t0)


Ratio = tuple[float, float, float]


def per_repetition(values: list[float], against: list[float]) -> Ratio:
    """The median, min and max of ``values[i] / against[i]``: each ratio within one repetition."""
    each = [v / a for v, a in zip(values, against, strict=True)]
    return round(statistics.median(each), 3), round(min(each), 3), round(max(each), 3)


def _writes(runs: list[Run], which: str) -> float | None:
    each = [r.per_1000(getattr(r, which)) for r in runs]
    known = [w for w in each if w is not None]
    return round(statistics.median(known), 2) if known else None


def regime_report(
    runs: dict[str, list[Run]], ratios: dict[str, Ratio], med: dict[str, float]
) -> dict[str, Any]:
    """The JSON fields of this module's workloads (and the ratios' spread of every workload)."""
    report: dict[str, Any] = {}
    for name, ratio in ratios.items():
        if name in runs:
            report[f"{name}_ratio"], report[f"{name}_ratio_min"], report[f"{name}_ratio_max"] = ratio
    for name, rs in runs.items():
        if name == "raw" or not any(r.checkpoint_writes is not None for r in rs):
            continue
        report[f"{name}_events_per_s"] = round(med[name])
        report[f"{name}_checkpoint_writes_per_1000"] = _writes(rs, "checkpoint_writes")
        if any(r.ack_writes is not None for r in rs):
            report[f"{name}_ack_writes_per_1000"] = _writes(rs, "ack_writes")
    for size in BATCH_SIZES:
        report[f"raw_batch_{size}_events_per_s"] = round(med[f"raw_batch_{size}"])
    for name, rs in runs.items():
        if name.startswith("slow_1ms_"):
            workers = int(name.split("_")[2])
            each = [r.events_per_s / (workers / SLOW_HANDLER_S) for r in rs]
            report[f"{name}_efficiency"] = round(statistics.median(each), 3)
    for key in COMPARISONS:
        report[f"{key}_ratio"], report[f"{key}_ratio_min"], report[f"{key}_ratio_max"] = ratios[key]
    return report


def regime_table(
    runs: dict[str, list[Run]], ratios: dict[str, Ratio], med: dict[str, float], pairs: dict[str, str]
) -> list[str]:
    """A table of every workload: events/s, ratio (median of per-repetition ratios, min-max), writes per 1,000."""
    lines = [
        f"{'workload':<34}{'events/s':>10}  {'ratio (min-max)':<22}{'ckpt/1000':>10}{'acks/1000':>10}  ratio to"
    ]
    for name, rs in runs.items():
        ratio = ratios.get(name)
        shown = f"{ratio[0]:.3f} ({ratio[1]:.3f}-{ratio[2]:.3f})" if ratio else ""
        ckpt, acks = _writes(rs, "checkpoint_writes"), _writes(rs, "ack_writes")
        pair = pairs.get(name, "")
        lines.append(
            f"{name:<34}{med[name]:>10,.0f}  {shown:<22}{'' if ckpt is None else f'{ckpt:.2f}':>10}{'' if acks is None else f'{acks:.2f}':>10}  {pair}"
        )
    lines.append("")
    lines.append(
        "the bus against hand-rolled consumers (bus / hand-rolled events/s; above 1: the bus is faster)"
    )
    for key, (bus, hand) in COMPARISONS.items():
        ratio = ratios[key]
        lines.append(f"  {key:<32}{ratio[0]:>8.3f} ({ratio[1]:.3f}-{ratio[2]:.3f})   {bus} / {hand}")
    return lines
