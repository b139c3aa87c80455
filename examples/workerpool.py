"""Worker pool: several consumers share one change stream as a consumer group.

The counterpart of the Go library's ``workerpool`` example (``DistributedWorkerMiddleware``):
instead of claiming every event in MongoDB, members of a group lease *partitions* of the
stream. Each change is handled by one member (at least once), per-document order holds,
and a member that stops (or dies) hands its partitions to the others.

Here three members run in one process for the demo; in production each is its own
process, pod or web worker, started with the same ``group=`` and ``partitions=``::

    python examples/workerpool.py

Runs against ``MONGODB_URI`` (a replica set) or, when it is unset, the built-in fake replica set.
"""

from __future__ import annotations

import threading
from collections import Counter

import mongo_events as me
from mongo_events.demo import demo_client

ORDERS = 30


def main() -> int:
    with demo_client() as client:
        orders = client["shop"]["orders"]
        handled: Counter[str] = Counter()
        lock = threading.Lock()
        done = threading.Semaphore(0)

        def member(name: str) -> me.Bus:
            bus = me.Bus(
                orders,
                name=name,
                group="workerpool-example",  # same group and partitions in every member
                partitions=6,
                lease_ttl=3.0,  # a dead member's partitions move after about this long
                max_await_time=0.1,
            )

            @bus.subscribe(operations={"insert"})
            def on_order(event: me.ChangeEvent) -> None:
                with lock:
                    handled[name] += 1
                done.release()

            return bus

        workers = [member(f"worker-{i}") for i in range(3)]
        for bus in workers:
            bus.start()
        # Members share the partitions within a few polls (lease_ttl / 12 each).
        settled = threading.Event()
        for _ in range(100):
            held = [len(bus.health().group.held) for bus in workers]  # type: ignore[union-attr]
            if sorted(held) == [2, 2, 2]:
                break
            settled.wait(0.1)
        for bus in workers:
            status = bus.health().group
            assert status is not None
            print(f"{bus.name} holds partitions {sorted(status.held)} ({status.lease_state})", flush=True)
        orders.insert_many([{"item": f"book-{i}"} for i in range(ORDERS)])
        ok = all(done.acquire(timeout=30) for _ in range(ORDERS))
        for bus in workers:
            bus.stop()  # releases its leases at once: another member would take over now
        for name in sorted(handled):
            print(f"{name} handled {handled[name]} orders", flush=True)
        print(f"{sum(handled.values())} orders handled once each by {len(handled)} workers")
    return 0 if ok and sum(handled.values()) == ORDERS else 1


if __name__ == "__main__":
    raise SystemExit(main())
