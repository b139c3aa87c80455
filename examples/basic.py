"""Basic: watch a collection and handle each change.

Runs against ``MONGODB_URI`` (a replica set) or, when it is unset, the built-in
fake replica set::

    python examples/basic.py
"""

from __future__ import annotations

import threading

import mongo_events as me
from mongo_events.demo import demo_client


def main() -> int:
    with demo_client() as client:
        orders = client["shop"]["orders"]
        bus = me.Bus(orders, full_document=me.FullDocument.UPDATE_LOOKUP, resume_token_id="basic-example")
        seen = threading.Semaphore(0)

        @bus.subscribe(operations={"insert", "update"})
        def on_order(event: me.ChangeEvent) -> None:
            print(
                f"{event.operation_type} {event.document_id} {(event.full_document or {}).get('status')}",
                flush=True,
            )
            seen.release()

        with bus:  # start() now, stop() (with a final checkpoint) on exit
            result = orders.insert_one({"item": "book", "status": "new"})
            orders.update_one({"_id": result.inserted_id}, {"$set": {"status": "paid"}})
            ok = all(seen.acquire(timeout=30) for _ in range(2))
        print("checkpoint saved under", bus.resume_token_key)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
