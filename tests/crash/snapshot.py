"""A consumer process for the snapshot crash test: a bus that snapshots ``crash.docs``.

Each handled snapshot event appends ``<run> <_id>`` to the log before the callback
returns, so the log is a lower bound of what was handled when the process is killed (a
write survives SIGKILL in the page cache: no fsync, which would make the scan slower than
the test's time budget allows). The handler is slowed a little so kills land in the middle of the scan.

With ``--expect N`` the process exits 0 once ``N`` distinct documents are in the log
and the stored checkpoint has moved on to the stream (no snapshot marker left), 3 if
that takes longer than ``--deadline`` seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

import pymongo

import mongo_events as me
from mongo_events.snapshot import parse_progress

KEY = "crash.docs:snap"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--run", type=int, required=True)
    parser.add_argument("--max-in-flight", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"run {args.run} %(levelname)s %(name)s: %(message)s")

    handled: set[str] = set()
    if os.path.exists(args.log):
        with open(args.log) as fh:
            handled = {line.split()[1] for line in fh if line.strip()}
    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
        args.uri, serverSelectionTimeoutMS=10000
    )
    bus = me.Bus(
        client["crash"]["docs"],
        resume_token_id="snap",
        snapshot="initial",
        snapshot_batch_size=args.batch_size,
        max_in_flight=args.max_in_flight,
        max_workers=4,
        flush_interval=0.05,
        max_await_time=0.05,
    )
    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    lock = threading.Lock()
    changed = threading.Event()
    pause = threading.Event()  # never set: its timed wait slows the handler

    @bus.subscribe(operations={"snapshot"})
    def handle(event: me.ChangeEvent) -> None:
        pause.wait(0.002)
        with lock:
            os.write(fd, f"{args.run} {event.document_id}\n".encode())
            handled.add(str(event.document_id))
        changed.set()

    bus.start()
    if not args.expect:
        bus.run_forever()
        return 0
    deadline = threading.Event()
    timer = threading.Timer(args.deadline, deadline.set)
    timer.daemon = True
    timer.start()
    store = me.MongoResumeTokenStore(client["crash"]["_event_resume_tokens"])
    while not deadline.is_set():
        if len(handled) >= args.expect and bus.health().phase == "streaming":
            bus.flush()
            checkpoint = store.load(KEY)
            if checkpoint is not None and parse_progress(checkpoint.token) is None:
                bus.stop(timeout=10)
                return 0
        changed.wait(0.05)
        changed.clear()
    bus.stop(timeout=10)
    print(f"run {args.run}: deadline passed with {len(handled)} of {args.expect} handled", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
