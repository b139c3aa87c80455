"""A consumer process for crash tests: a bus that logs each handled change durably.

Each handled change appends ``<run> <document id>`` to the log and fsyncs
before the callback returns, so the log is a lower bound of what was handled
when the process is killed.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from datetime import timedelta

import pymongo

import mongo_events as me


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--run", type=int, required=True)
    parser.add_argument("--max-in-flight", type=int, default=50)
    parser.add_argument(
        "--expect", type=int, default=0, help="exit 0 once this many distinct ids are handled"
    )
    args = parser.parse_args(argv)

    handled: set[str] = set()
    if args.expect and os.path.exists(args.log):
        with open(args.log) as fh:
            handled = {line.split()[1] for line in fh if line.strip()}
    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
        args.uri, serverSelectionTimeoutMS=10000
    )
    bus = me.Bus(
        client["crash"]["orders"],
        resume_token_id="crash",
        max_in_flight=args.max_in_flight,
        max_workers=4,
        flush_interval=0.05,
        max_await_time=0.05,
        start_from_past=timedelta(hours=1),
    )
    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    lock = threading.Lock()
    complete = threading.Event()

    @bus.subscribe(operations={"insert"})
    def handle(event: me.ChangeEvent) -> None:
        key = str(event.document_id)
        with lock:
            os.write(fd, f"{args.run} {key}\n".encode())
            os.fsync(fd)
            handled.add(key)
            if args.expect and len(handled) >= args.expect:
                complete.set()

    bus.start()
    print("ready", flush=True)  # the harness times most kills from here (a loaded machine imports slowly)
    if args.expect and len(handled) >= args.expect:
        complete.set()
    if args.expect:
        ok = complete.wait(120)
        bus.stop(timeout=10)
        return 0 if ok else 3
    bus.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
