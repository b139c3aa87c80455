"""One member of a consumer group, for the multi-process group tests.

Each delivery appends ``<name> <document id> <v>`` to ``--log``; each lease change appends
``<unix time> <name> take|drop <partition> <fence>`` to ``--owners`` (``take`` once the lease
is held, before the partition's stream starts; ``drop`` when it is given up, before its
lease is released). Both are single ``O_APPEND`` writes, so lines from several processes
never interleave. Runs until SIGTERM (a graceful stop) or SIGKILL.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pymongo

import mongo_events as me
from mongo_events.groups import runtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uri", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--owners", required=True)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--max-in-flight", type=int, default=50)
    args = parser.parse_args(argv)

    log_fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    owners_fd = os.open(args.owners, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def owner_line(what: str, p: int, fence: int) -> None:
        os.write(owners_fd, f"{time.time():.6f} {args.name} {what} {p} {fence}\n".encode())

    assigned, revoked = runtime.GroupRuntime._assigned, runtime.GroupRuntime._revoked

    def on_assigned(self: runtime.GroupRuntime, p: int, fence: int) -> None:
        owner_line("take", p, fence)
        assigned(self, p, fence)

    def on_revoked(self: runtime.GroupRuntime, p: int, why: str) -> None:
        owner_line("drop", p, self.member.owned.get(p, 0) if self.member else 0)
        revoked(self, p, why)

    runtime.GroupRuntime._assigned = on_assigned  # type: ignore[method-assign]
    runtime.GroupRuntime._revoked = on_revoked  # type: ignore[method-assign]

    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
        args.uri, serverSelectionTimeoutMS=10000
    )
    bus = me.Bus(
        client["grp"]["orders"],
        name=args.name,
        group="workers",
        partitions=args.partitions,
        lease_ttl=args.ttl,
        max_in_flight=args.max_in_flight,
        max_workers=4,
        flush_interval=0.05,
        max_await_time=0.05,
    )

    @bus.subscribe
    def record(event: me.ChangeEvent) -> None:
        # The change's own value (a looked-up full document could show a later one).
        desc = event.update_description
        fields = desc.updated_fields if desc is not None else (event.full_document or {})
        os.write(log_fd, f"{args.name} {event.document_key['_id']} {fields.get('v', -1)}\n".encode())

    print(f"{args.name} pid {os.getpid()} starting", flush=True)
    bus.run_forever(stop_timeout=5)
    print(f"{args.name} stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
