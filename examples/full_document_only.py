"""full_document_only: callbacks get the document itself (a delete hands over its key).

python examples/full_document_only.py
"""

from __future__ import annotations

import threading
from typing import Any

import mongo_events as me
from mongo_events.demo import demo_client


def main() -> int:
    with demo_client() as client:
        users = client["app"]["users"]
        bus = me.Bus(
            users,
            full_document=me.FullDocument.UPDATE_LOOKUP,
            full_document_only=True,
            resume=False,
            ordering="stream",
        )
        done = threading.Semaphore(0)

        @bus.subscribe(payload=dict)
        def on_user(doc: dict[str, Any], delivery: me.Delivery) -> None:
            print(f"{delivery.event.operation_type}: {doc}", flush=True)
            done.release()

        with bus:
            users.insert_one({"_id": "u1", "name": "Ada"})
            users.update_one({"_id": "u1"}, {"$set": {"name": "Ada Lovelace"}})
            # updateLookup reads the document when the update is delivered: deleting it
            # first would leave the update without a document (full_document_only needs one).
            ok = all(done.acquire(timeout=30) for _ in range(2))
            users.delete_one({"_id": "u1"})
            ok = ok and done.acquire(timeout=30)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
