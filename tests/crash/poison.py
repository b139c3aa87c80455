"""A consumer whose handler kills the process on one poison event (``os._exit(1)``).

Every other handled change appends ``<run> <id>`` to the log and fsyncs. The
idempotency store (MongoDB, on the server under test; ``--mode crash_store`` uses it
as ``crash_store=`` instead of ``idempotency=``) counts claims that never finished;
after ``--max-crashes`` of them (3 with ``crash_store``) the poison event is dead-lettered. The
process exits 0 once the poison event is in the dead letters and ``--expect``
other changes are handled, 3 if that takes longer than ``--deadline`` seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from datetime import timedelta

import pymongo

import mongo_events as me
from mongo_events.idempotency import guard


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--run", type=int, required=True)
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--max-crashes", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--mode", choices=["idempotency", "crash_store"], default="idempotency")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"run {args.run} %(levelname)s %(name)s: %(message)s")

    handled: set[str] = set()
    if os.path.exists(args.log):
        with open(args.log) as fh:
            handled = {line.split()[1] for line in fh if line.strip()}
    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
        args.uri, serverSelectionTimeoutMS=10000
    )
    internal = client["poison_internal"]
    letters = me.MongoDeadLetterStore(internal["event_dlq"])
    store = me.MongoIdempotencyStore(internal["event_idempotency"])
    options: dict[str, object] = {"crash_store": store}  # counts starts, does not deduplicate
    # A dead process's start counts as a crash once its claim expired: shorter here than
    # a restart takes (a restart within the lease would run uncounted, as documented).
    guard.CRASH_LEASE = timedelta(milliseconds=50)
    if args.mode == "idempotency":
        # A dead process's claim blocks its event's redelivery this long: short here.
        options = {
            "idempotency": me.Idempotency(
                store, processing_ttl=timedelta(milliseconds=300), max_crashes=args.max_crashes
            )
        }
    bus = me.Bus(
        client["poison"]["orders"],
        resume_token_id="poison",
        max_workers=4,
        flush_interval=0.05,
        max_await_time=0.05,
        start_from_past=timedelta(hours=1),
        dead_letters=letters,
        **options,  # type: ignore[arg-type]
    )
    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    lock = threading.Lock()
    changed = threading.Event()
    pause = threading.Event()  # never set: its timed wait makes handlers take a while

    @bus.subscribe(name="handle", operations={"insert"}, max_retries=0)
    def handle(event: me.ChangeEvent) -> None:
        key = str(event.document_id)
        if key == "poison":
            os._exit(1)  # a segfault in a C extension, an OOM kill: the process is gone
        pause.wait(0.02)  # slow enough that others are in flight when the poison one kills the process
        with lock:
            os.write(fd, f"{args.run} {key}\n".encode())
            os.fsync(fd)
            handled.add(key)
        changed.set()

    bus.start()
    deadline = threading.Event()
    timer = threading.Timer(args.deadline, deadline.set)
    timer.daemon = True
    timer.start()
    while not deadline.is_set():
        if len(handled) >= args.expect and letters.count() >= 1:
            bus.stop(timeout=10)
            return 0
        changed.wait(0.1)
        changed.clear()
    bus.stop(timeout=10)
    print(
        f"run {args.run}: deadline passed with {len(handled)} of {args.expect} handled, {letters.count()} dead letter(s)",
        file=sys.stderr,
    )
    return 3


if __name__ == "__main__":
    sys.exit(main())
