"""The durable queue: an order placed in a transaction becomes a job; two competing workers share
the jobs, one customer's jobs run in order, a failed job is retried.

Go's ``persistent.NewStore`` + ``composite.New`` with a Redis signal become
``Queue(collection, signal=RedisSignal(url))``. Set ``REDIS_URL`` to use the signal
(else the workers poll every 0.2 s)::

    python examples/durable_queue.py

(The file is not called ``queue.py``: run as a script, that name would shadow the standard
library's ``queue`` module, which the worker pool imports.)
"""

from __future__ import annotations

import dataclasses
import os
import threading

import mongo_events as me
from mongo_events.demo import demo_client

PRINT = threading.Lock()


def say(text: str) -> None:
    with PRINT:
        print(text, flush=True)


@dataclasses.dataclass
class OrderPlaced:
    order_id: int
    customer: str
    total: float


def main() -> int:
    url = os.environ.get("REDIS_URL")
    with demo_client() as client:
        db = client["shop"]
        db.drop_collection("jobs")
        done = threading.Semaphore(0)
        failed_once: set[int] = set()

        def worker(name: str) -> me.Queue:
            queue = me.Queue(
                db["jobs"], signal=me.RedisSignal(url) if url else None, poll_interval=0.2, name=name
            )

            @queue.subscribe(
                event="order.placed",
                payload=OrderPlaced,
                ordered=True,
                retry_backoff=me.RetryBackoff(min=0.01, max=0.05),
            )
            def ship(order: OrderPlaced, delivery: me.Delivery) -> None:
                if order.order_id == 3 and order.order_id not in failed_once:
                    failed_once.add(order.order_id)
                    raise RuntimeError("the carrier API timed out")  # retried: attempt 2 succeeds
                say(
                    f"{name}: shipped order {order.order_id} of {order.customer} (attempt {delivery.attempt})"
                )
                done.release()

            return queue

        publisher = me.Queue(db["jobs"], signal=me.RedisSignal(url) if url else None)
        with worker("worker-1"), worker("worker-2"):
            for order_id in range(1, 7):
                order = OrderPlaced(order_id, customer=f"customer-{order_id % 2}", total=10.0 * order_id)
                # The outbox: the order and its job are written together (on a real server, in one
                # transaction: the job exists if and only if the order does).
                with client.start_session() as session, session.start_transaction():
                    db["orders"].insert_one(dataclasses.asdict(order), session=session)
                    publisher.publish("order.placed", order, key=order.customer, session=session)
                publisher.notify("order.placed")
            for _ in range(6):
                if not done.acquire(timeout=30):
                    say("timed out waiting for the jobs")
                    return 1
        stats = publisher.stats("order.placed")
        say(f"stats: {stats.acked} acked, {stats.pending} pending, {stats.inflight} in flight")
        return 0 if stats.acked == 6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
