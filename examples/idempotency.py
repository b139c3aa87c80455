"""Idempotency: a replayed stream runs each effect once, and a failed handler's retry still runs.

The Go example of the same name calls ``IsDuplicate`` then ``MarkProcessed`` by hand; here the
bus claims each event's key before the callback and completes it after success
(``idempotency=``), so a failure releases the key instead of marking it processed::

    python examples/idempotency.py
"""

from __future__ import annotations

import threading
from datetime import timedelta

import mongo_events as me
from mongo_events.demo import demo_client

PRINT = threading.Lock()


def say(text: str) -> None:
    with PRINT:
        print(text, flush=True)


class Finished(me.Middleware):
    """Counts deliveries that finished: handled, or skipped as duplicates."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.done = threading.Semaphore(0)

    def after_delivery(self, delivery: me.Delivery, error: BaseException | None, duration: float) -> None:
        if error is None:
            self.done.release()

    def after_delivery_skipped(self, delivery: me.Delivery, skip: me.Skip) -> None:
        say(f"{self.label}: skipped order {delivery.event.document_id} ({type(skip).__name__})")
        self.done.release()


def main() -> int:
    with demo_client() as client:
        orders = client["shop"]["orders"]
        store = me.MongoIdempotencyStore(client["shop_internal"]["event_idempotency"], ttl=timedelta(days=7))
        charged: list[object] = []
        failed_once: set[object] = set()
        lock = threading.Lock()

        def consume(label: str) -> int:
            """One consumer life reading the orders from the start of the hour; returns its duplicates."""
            finished = Finished(label)
            bus = me.Bus(
                orders,
                resume=False,
                start_from_past=timedelta(hours=1),
                idempotency=store,
                middleware=[finished],
            )

            @bus.subscribe(
                name="charge", operations={"insert"}, retry_backoff=me.RetryBackoff(min=0.01, max=0.05)
            )
            def charge(event: me.ChangeEvent, delivery: me.Delivery) -> None:
                with lock:
                    if event.document_id == 2 and event.document_id not in failed_once:
                        failed_once.add(event.document_id)
                        raise ConnectionError("payment service timed out")  # released: the retry runs
                    charged.append(event.document_id)
                say(f"{label}: charged order {event.document_id} (attempt {delivery.attempt})")

            with bus:
                if not all(finished.done.acquire(timeout=30) for _ in range(3)):
                    raise SystemExit(f"{label}: not every order was handled")
            guard = bus.subscriptions[0].idempotency
            return guard.duplicates if guard is not None else 0

        orders.insert_many([{"_id": i, "total": 10 * i} for i in (1, 2, 3)])
        consume("first run")
        duplicates = consume("replay")  # the same three events again, as after a restart or failover
        say(f"charged {sorted(charged)}; the replay skipped {duplicates} duplicates")
    return 0 if sorted(charged) == [1, 2, 3] and duplicates == 3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
