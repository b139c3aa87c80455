"""One of two consumers that read the same changes (no group, both from the past) and share an
idempotency store. Each effect appends ``<name> <id>`` to a shared log; the process exits 0
once every one of ``--expect`` changes is done for it (handled here, or a duplicate), 3 after
``--deadline`` seconds.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
from datetime import timedelta

import pymongo

import mongo_events as me


class Done(me.Middleware):
    """Counts deliveries finished here: handled, or skipped as duplicates."""

    def __init__(self) -> None:
        self.count = 0
        self.duplicates = 0
        self.changed = threading.Event()
        self._lock = threading.Lock()

    def after_delivery(self, delivery: me.Delivery, error: BaseException | None, duration: float) -> None:
        if error is None:
            with self._lock:
                self.count += 1
            self.changed.set()

    def after_delivery_skipped(self, delivery: me.Delivery, skip: me.Skip) -> None:
        with self._lock:
            self.count += 1
            self.duplicates += isinstance(skip, me.Duplicate)
        self.changed.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--redis")
    parser.add_argument("--prefix", default="idemp:")
    parser.add_argument("--log", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=60.0)
    args = parser.parse_args(argv)

    rng = random.Random(f"{args.seed}-{args.name}")
    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
        args.uri, serverSelectionTimeoutMS=10000
    )
    store: me.IdempotencyStore
    if args.redis:
        import redis

        store = me.RedisIdempotencyStore(redis.Redis.from_url(args.redis), prefix=args.prefix)
    else:
        store = me.MongoIdempotencyStore(client["twins_internal"]["event_idempotency"])
    done = Done()
    bus = me.Bus(
        client["twins"]["orders"],
        resume_token_id=args.name,  # two independent consumers: each reads every change
        max_workers=4,
        flush_interval=0.05,
        max_await_time=0.05,
        start_from_past=timedelta(hours=1),
        idempotency=me.Idempotency(store, processing_ttl=timedelta(seconds=30)),
        middleware=[done],
    )
    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pause = threading.Event()  # never set: its timed wait spreads the handlers out

    @bus.subscribe(name="effect", operations={"insert"})
    def effect(event: me.ChangeEvent) -> None:
        pause.wait(rng.uniform(0, 0.01))
        os.write(fd, f"{args.name} {event.document_id}\n".encode())
        os.fsync(fd)

    bus.start()
    deadline = threading.Event()
    timer = threading.Timer(args.deadline, deadline.set)
    timer.daemon = True
    timer.start()
    while not deadline.is_set() and done.count < args.expect:
        done.changed.wait(0.1)
        done.changed.clear()
    bus.stop(timeout=10)
    print(f"{args.name} done={done.count} duplicates={done.duplicates}", flush=True)
    return 0 if done.count >= args.expect else 3


if __name__ == "__main__":
    sys.exit(main())
