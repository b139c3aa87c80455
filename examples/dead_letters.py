"""Dead letters: a failing callback's events are stored after its retries, then replayed once fixed.

python examples/dead_letters.py
"""

from __future__ import annotations

import threading

import mongo_events as me
from mongo_events.demo import demo_client


def main() -> int:
    with demo_client() as client:
        orders = client["shop"]["orders"]
        store = me.MongoDeadLetterStore(client["shop_internal"]["event_dlq"])
        bus = me.Bus(orders, resume=False, dead_letters=store)
        broken = threading.Event()
        broken.set()

        @bus.subscribe(name="invoice", max_retries=2, retry_backoff=me.RetryBackoff(min=0.01, max=0.05))
        def invoice(event: me.ChangeEvent, delivery: me.Delivery) -> None:
            if broken.is_set():
                raise ConnectionError("invoice service unreachable")
            print(
                f"invoiced order {event.document_id} (replay={delivery.replay}, was: {delivery.original_error})",
                flush=True,
            )

        with bus:
            orders.insert_one({"_id": 1, "total": 12})
            deadline = threading.Event()
            while store.count() == 0 and not deadline.wait(0.05):
                pass
        letters = me.DeadLetters(store, bus)
        for letter in letters.list():
            print(
                f"dead letter {letter.id}: {letter.event_name} gave up after {letter.retry_count} attempts: {letter.error}",
                flush=True,
            )
        broken.clear()  # the service is back
        result = letters.replay()
        print(f"replayed {result.replayed}, failed {result.failed}", flush=True)
    return 0 if result.replayed == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
