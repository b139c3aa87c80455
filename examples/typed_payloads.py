"""Typed payloads: cattrs decodes each change into your dataclass; bad documents go to dead letters.

python examples/typed_payloads.py
"""

from __future__ import annotations

import dataclasses
import threading

import mongo_events as me
from mongo_events.demo import demo_client


@dataclasses.dataclass
class Item:
    sku: str
    qty: int


@dataclasses.dataclass
class Order:
    _id: int
    customer: str
    items: list[Item]


@dataclasses.dataclass
class OrderChange:
    operation_type: str
    full_document: Order


def main() -> int:
    with demo_client() as client:
        orders = client["shop"]["orders"]
        letters = me.MemoryDeadLetterStore()
        bus = me.Bus(orders, full_document=me.FullDocument.UPDATE_LOOKUP, resume=False, dead_letters=letters)
        done = threading.Semaphore(0)

        @bus.subscribe(payload=OrderChange, operations={"insert"})
        def on_order(change: OrderChange) -> None:
            total = sum(i.qty for i in change.full_document.items)
            print(
                f"{change.operation_type} order {change.full_document._id} for {change.full_document.customer}: {total} items",
                flush=True,
            )
            done.release()

        with bus:
            orders.insert_one(
                {"_id": 1, "customer": "ada", "items": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 1}]}
            )
            orders.insert_one(
                {"_id": 2, "customer": "bob", "items": [{"sku": "c", "qty": "many"}]}
            )  # cannot decode
            ok = done.acquire(timeout=30)
            pause = threading.Event()
            for _ in range(600):  # the undecodable order reaches the dead letters on its own time
                if letters.count() or pause.wait(0.05):
                    break
        for letter in letters.list():
            print(
                f"dead letter for order {letter.payload['documentKey']['_id']}: {letter.error.splitlines()[0]}",
                flush=True,
            )
    return 0 if ok and letters.count() == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
