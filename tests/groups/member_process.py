"""A group member in its own process, for the multi-process tests.

Usage: ``python -m tests.groups.member_process URI NAME TTL LOG [PARTITIONS]``. It joins
group ``g`` (one partition unless told). While it holds the partition, a writer thread "delivers" an event (if
``holds()`` says the lease is still good) and writes a fenced checkpoint every 20 ms.
Every step is appended to LOG as a line: ``assigned P FENCE``, ``wrote N FENCE``,
``fenced-out N``, ``skipped N``, ``revoked P``; ``assigned`` and ``revoked`` lines end with
the wall-clock time, for the owner log of the multi-member test.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pymongo

from mongo_events import FencedOut, MongoResumeTokenStore
from mongo_events.groups import FencedResumeTokenStore, GroupMember, MongoLeaseStore


def main() -> None:
    uri, name, ttl, log_path = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    partitions = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(uri, serverSelectionTimeoutMS=2000)
    tokens = MongoResumeTokenStore(client.db["_event_resume_tokens"])
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - line-buffered for the whole process
    writers: dict[int, tuple[threading.Event, threading.Thread]] = {}

    def say(line: str) -> None:
        log.write(line + "\n")
        log.flush()

    def write_loop(p: int, fence: int, stop: threading.Event) -> None:
        store = FencedResumeTokenStore(tokens, fence)
        n = 0
        while not stop.wait(0.02):
            n += 1
            if not member.holds(p):
                say(f"skipped {n}")
                continue
            try:
                store.save(member.key(p), {"_data": f"{name}-{n}"})
            except FencedOut:
                say(f"fenced-out {n}")
                return
            say(f"wrote {n} {fence}")

    def on_assigned(p: int, fence: int) -> None:
        say(f"assigned {p} {fence}" + (f" {time.time()}" if partitions > 1 else ""))
        stop = threading.Event()
        thread = threading.Thread(target=write_loop, args=(p, fence, stop), daemon=True)
        writers[p] = (stop, thread)
        thread.start()

    def on_revoked(p: int) -> None:
        stop, thread = writers.pop(p)
        stop.set()
        thread.join(5)
        say(f"revoked {p}" + (f" {time.time()}" if partitions > 1 else ""))

    member = GroupMember(
        MongoLeaseStore(client.db["_event_leases"]),
        "g",
        "db.orders",
        partitions=partitions,
        ttl=ttl,
        on_assigned=on_assigned,
        on_revoked=on_revoked,
    )
    member.start()
    sys.stdin.read()  # until the test closes our stdin
    member.stop(5)
    say("stopped")


if __name__ == "__main__":
    main()
