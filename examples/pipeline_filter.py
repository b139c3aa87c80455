"""A server-side $match: only paid orders reach the callback; the position still moves.

python examples/pipeline_filter.py
"""

from __future__ import annotations

import threading

import mongo_events as me
from mongo_events.demo import demo_client


def main() -> int:
    with demo_client() as client:
        orders = client["shop"]["orders"]
        bus = me.Bus(
            orders,
            full_document=me.FullDocument.UPDATE_LOOKUP,
            pipeline=[
                {"$match": {"operationType": "update", "updateDescription.updatedFields.status": "paid"}}
            ],
            update_description=True,
            resume=False,
        )
        paid = threading.Semaphore(0)

        @bus.subscribe
        def on_paid(event: me.ChangeEvent, delivery: me.Delivery) -> None:
            assert delivery.update_description is not None and delivery.update_description.has_field("status")
            print(f"order {event.document_id} paid: {event.full_document}", flush=True)
            paid.release()

        with bus:
            for i in range(3):
                orders.insert_one({"_id": i, "status": "new"})
            orders.update_one({"_id": 1}, {"$set": {"status": "paid"}})
            orders.update_one({"_id": 2}, {"$set": {"status": "shipped"}})
            ok = paid.acquire(timeout=30)
            bus.join(10)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
