"""A process of the multi-process queue test: ``consume`` (until SIGTERM) or ``publish`` (then exit).

A consumer appends ``<name> <n> <key>`` per handled message to the shared log, with
one ``os.write`` on an ``O_APPEND`` descriptor (atomic for short lines), before its
callback returns: a line means "handled", and a later ack may never happen.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import pymongo

from mongo_events.queue import Queue


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["consume", "publish"])
    parser.add_argument("--uri", required=True)
    parser.add_argument("--log", default="")
    parser.add_argument("--name", default="c")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--keys", type=int, default=50)
    parser.add_argument("--visibility", type=float, default=2.0)
    args = parser.parse_args()
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(args.uri, serverSelectionTimeoutMS=10000)
    coll = client["jobs"]["messages"]
    if args.role == "publish":
        publisher = Queue(coll)
        batch: list[tuple[str, Any, str | None]] = []
        for n in range(args.count):
            batch.append(("job", {"n": n}, f"k{n % args.keys}"))
            if len(batch) == 100:
                publisher.publish_many(batch)
                batch = []
        if batch:
            publisher.publish_many(batch)
        return
    fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    queue = Queue(
        coll,
        name=args.name,
        poll_interval=0.05,
        visibility_timeout=args.visibility,
        max_workers=4,
        prefetch=50,
    )

    @queue.subscribe(event="job", ordered=True, max_retries=0, on_exhausted="skip")
    def handle(payload: dict[str, Any]) -> None:
        os.write(fd, f"{args.name} {payload['n']} k{payload['n'] % args.keys}\n".encode())

    print("ready", flush=True)
    queue.run_forever()


if __name__ == "__main__":
    main()
