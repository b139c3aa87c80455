"""Ack tracking and the dead-letter store through the bus, and replay."""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import timedelta
from typing import Any

import pymongo
import pytest

import mongo_events as me
from mongo_events.testing import FakeReplicaSet

from .conftest import wait_for
from .helpers import QUICK, Item, Recorder


@dataclasses.dataclass
class Order:
    _id: int
    items: list[Item]


def test_ack_records_go_pending_then_acked(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    acks = me.MongoAckStore(client.internal["_event_acks"], ttl=timedelta(hours=1))
    release = threading.Event()
    started = Recorder()
    bus = make_bus(client.shop.orders, ack_store=acks)

    @bus.subscribe
    def handle(ev: me.ChangeEvent) -> None:
        started.add(ev.id)
        assert release.wait(10)

    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    (event_id,) = started.wait(1)
    bus.flush()
    pending = acks.get(event_id)
    assert pending is not None and pending.status is me.AckStatus.PENDING
    assert acks.pending_count() == 1
    release.set()
    assert bus.join(5)
    bus.flush()
    done = acks.get(event_id)
    assert done is not None and done.status is me.AckStatus.ACKED and done.created_at == pending.created_at
    assert acks.pending_count() == 0
    assert "acked_at_1" in client.internal["_event_acks"].index_information()  # start() made the indexes


def test_ack_writes_are_batched(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    acks = me.MemoryAckStore()
    rec = Recorder()
    # The window never fills, so only the flusher's ticks (at most one per interval) and the final
    # flush at stop write: the bound comes from the elapsed time, not from a speed guess.
    bus = make_bus(
        client.shop.orders, ack_store=acks, flush_interval=0.5, batch_size=1000, max_in_flight=10_000
    )
    bus.subscribe(lambda ev: rec.add(1))
    bus.start()
    began = time.monotonic()
    client.shop.orders.insert_many([{"_id": i} for i in range(5000)])
    rec.wait(5000, timeout=60)
    assert bus.join(10)
    bus.stop()
    elapsed = time.monotonic() - began
    assert acks.count(me.AckFilter(status=me.AckStatus.ACKED)) == 5000
    assert 1 <= bus.ack_writes <= elapsed / 0.5 + 2 and acks.writes == bus.ack_writes
    assert bus.ack_writes < 500  # batched: nowhere near one write per event


def test_a_failed_ack_write_holds_the_checkpoint_back(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    """The checkpoint never covers events whose ack records are not stored yet."""

    class Down(me.MemoryAckStore):
        down = True

        def write(self, records: list[me.AckRecord]) -> None:
            if self.down:
                raise me.StoreError("ack store down")
            super().write(records)

    acks = Down()
    tokens = me.MemoryResumeTokenStore()
    rec = Recorder()
    bus = make_bus(client.shop.orders, ack_store=acks, resume_token_store=tokens, flush_interval=60)
    bus.subscribe(lambda ev: rec.add(ev.id))
    bus.start()
    before = tokens.load(bus.resume_token_key)
    client.shop.orders.insert_many([{"_id": i} for i in range(3)])
    ids = rec.wait(3)
    assert bus.join(5)
    assert bus.flush() is False
    assert tokens.load(bus.resume_token_key) == before  # the acks failed: no checkpoint either
    acks.down = False
    assert bus.flush() is True
    after = tokens.load(bus.resume_token_key)
    assert after is not None and after != before
    assert all((r := acks.get(i)) is not None and r.status is me.AckStatus.ACKED for i in ids)


def test_poison_event_is_retried_dead_lettered_and_the_stream_moves_on(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    dlq = me.MongoDeadLetterStore(client.internal["event_dlq"])
    ok = Recorder()
    bus = make_bus(client.shop.orders, dead_letters=dlq, name="orders-bus")

    @bus.subscribe(name="orders", max_retries=2, retry_backoff=QUICK)
    def handle(ev: me.ChangeEvent) -> None:
        if ev.document_id == "poison":
            raise ValueError("cannot ship to the moon")
        ok.add(ev.document_id)

    bus.start()
    client.shop.orders.insert_one({"_id": "poison"})
    client.shop.orders.insert_one({"_id": "fine"})
    assert ok.wait(1) == ["fine"]
    assert bus.join(5)
    (letter,) = dlq.list()
    assert letter.event_name == "orders" and letter.source == "orders-bus"
    assert (
        letter.error == "ValueError: cannot ship to the moon" and letter.retry_count == 2
    )  # retries: 3 attempts
    assert letter.payload["documentKey"] == {"_id": "poison"} and letter.payload["operationType"] == "insert"
    assert letter.metadata["namespace"] == "shop.orders"
    assert dlq.get_by_original_id(letter.original_id) == letter


def test_decode_errors_are_dead_lettered_with_readable_paths(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    dlq = me.MemoryDeadLetterStore()
    bus = make_bus(
        client.shop.orders,
        dead_letters=dlq,
        full_document=me.FullDocument.UPDATE_LOOKUP,
        full_document_only=True,
    )
    calls = Recorder()
    bus.subscribe(payload=Order, name="orders")(calls.add)
    bus.start()
    client.shop.orders.insert_one({"_id": 1, "items": [{"sku": "a", "qty": "lots"}]})
    client.shop.orders.insert_one({"_id": 2, "items": [{"sku": "b", "qty": 1}]})
    assert calls.wait(1) == [Order(2, [Item("b", 1)])]
    assert bus.join(5)
    (letter,) = dlq.list()
    assert letter.retry_count == 0  # decode errors are not retried
    assert "DecodeError" in letter.error and "$.items[0].qty" in letter.error


def test_replay_delivers_again_and_marks_retried(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    dlq = me.MemoryDeadLetterStore()
    broken = threading.Event()
    broken.set()
    seen = Recorder()
    bus = make_bus(client.shop.orders, dead_letters=dlq)

    @bus.subscribe(name="orders", max_retries=0)
    def handle(ev: me.ChangeEvent, d: me.Delivery) -> None:
        if broken.is_set():
            raise RuntimeError("downstream is down")
        seen.add((ev.document_id, d.replay, d.original_error, d.event.id))

    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    assert wait_for(lambda: dlq.count() == 1)
    (original,) = dlq.list()
    broken.clear()  # downstream is back
    manager = me.DeadLetters(dlq, bus)
    assert manager.replay() == me.ReplayResult(replayed=1)
    assert seen.items == [(1, True, "RuntimeError: downstream is down", original.original_id)]
    replayed = manager.get(original.id)
    assert replayed is not None and replayed.retried_at is not None
    assert manager.replay() == me.ReplayResult()  # retried letters are not replayed again by default
    assert manager.replay_one(original.id) is me.ReplayOutcome.SKIPPED


def test_failed_replays_quarantine_after_max_attempts_and_terminal_errors_at_once(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    dlq = me.MemoryDeadLetterStore()
    bus = make_bus(client.shop.orders, dead_letters=dlq)

    @bus.subscribe(name="orders", max_retries=0)
    def handle(ev: me.ChangeEvent) -> None:
        raise (PermissionError if ev.document_id == "forbidden" else RuntimeError)("still broken")

    bus.start()
    client.shop.orders.insert_many([{"_id": "flaky"}, {"_id": "forbidden"}])
    assert wait_for(lambda: dlq.count() == 2)
    manager = me.DeadLetters(
        dlq, bus, max_replay_attempts=2, is_terminal=lambda e: isinstance(e, PermissionError)
    )
    assert manager.replay() == me.ReplayResult(failed=1, quarantined=1)
    assert manager.replay() == me.ReplayResult(quarantined=1)
    assert all(d.quarantined_at is not None for d in dlq.list())
    flaky = next(d for d in dlq.list() if d.payload["documentKey"] == {"_id": "flaky"})
    assert flaky.replay_count == 2
    assert manager.stats().quarantined == 2
    assert manager.count(me.DeadLetterFilter(exclude_quarantined=True)) == 0


def test_dead_letter_store_failures_keep_the_event_undone_and_the_checkpoint_behind(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    class Flaky(me.MemoryDeadLetterStore):
        def __init__(self) -> None:
            super().__init__()
            self.failures = 3
            self.attempted = Recorder()

        def store(self, letter: me.DeadLetter) -> str:
            self.attempted.add(letter.original_id)
            if self.failures:
                self.failures -= 1
                raise me.StoreError("dead-letter store down")
            assert allow.wait(10)  # the checks below see the event undone until then
            return super().store(letter)

    allow = threading.Event()
    dlq = Flaky()
    tokens = me.MemoryResumeTokenStore()
    bus = make_bus(client.shop.orders, dead_letters=dlq, resume_token_store=tokens)
    bus.subscribe(
        lambda ev: (_ for _ in ()).throw(ValueError("boom")),
        name="orders",
        max_retries=0,
        retry_backoff=QUICK,
    )
    bus.start()
    bus.flush()
    before = tokens.load(bus.resume_token_key)
    client.shop.orders.insert_one({"_id": 1})
    assert len(dlq.attempted.wait(2)) >= 2
    bus.flush()
    assert tokens.load(bus.resume_token_key) == before
    allow.set()
    assert len(dlq.attempted.wait(4)) == 4
    assert bus.join(5)
    assert dlq.count() == 1


def test_cleanup_and_delete(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    dlq = me.MemoryDeadLetterStore()
    bus = make_bus(client.shop.orders, dead_letters=dlq)
    bus.subscribe(lambda ev: (_ for _ in ()).throw(ValueError("x")), name="orders", max_retries=0)
    bus.start()
    client.shop.orders.insert_many([{"_id": i} for i in range(3)])
    assert wait_for(lambda: dlq.count() == 3)
    manager = me.DeadLetters(dlq, bus)
    assert manager.cleanup(older_than=timedelta(days=1)) == 0
    first = manager.list()[0]
    assert manager.delete(first.id) is True
    assert manager.delete_by_filter(me.DeadLetterFilter(event_name="orders")) == 2
    assert manager.cleanup(older_than=timedelta(0)) == 0 and manager.count() == 0
    with pytest.raises(me.ConfigurationError, match="needs the bus"):
        me.DeadLetters(dlq).replay()
