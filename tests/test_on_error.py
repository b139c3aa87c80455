"""``Bus(on_error=fn)``: the counterpart of Go's ``WithErrorHandler``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pymongo
import pytest

import mongo_events as me
from mongo_events.testing import FakeReplicaSet

from .helpers import QUICK, Recorder


def _recorder() -> tuple[Recorder, Any]:
    seen = Recorder()
    return seen, lambda error, context: seen.add((error, context))


def _boom(ev: me.ChangeEvent) -> None:
    raise ValueError("boom")


def test_handler_failures_are_reported_with_subscription_event_and_attempt(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    seen, hook = _recorder()
    dead = Recorder()
    bus = make_bus(client.shop.orders, on_error=hook, dead_letters=lambda ev, sub, err, n: dead.add(ev.id))
    bus.subscribe(_boom, name="h", max_retries=1, retry_backoff=QUICK)
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    event_id = dead.wait(1)[0]
    items = seen.wait(2)
    assert [(type(e), c.kind, c.subscription, c.event_id, c.attempt) for e, c in items] == [
        (ValueError, "handler", "h", event_id, 1),
        (ValueError, "handler", "h", event_id, 2),
    ]
    assert all(c.bus == bus.name for _, c in items)


def test_decode_errors_are_handler_errors(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    import dataclasses

    @dataclasses.dataclass
    class Order:
        qty: int

    seen, hook = _recorder()
    bus = make_bus(client.shop.orders, on_error=hook, dead_letters=lambda *a: None)
    bus.subscribe(lambda order: None, name="typed", payload=Order)
    bus.start()
    client.shop.orders.insert_one({"_id": 1, "qty": "many"})
    error, context = seen.wait(1)[0]
    assert isinstance(error, me.DecodeError)
    assert (context.kind, context.subscription) == ("handler", "typed")


def test_dead_letter_failures_are_reported_and_the_event_stays_undone(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    seen, hook = _recorder()
    stored = Recorder()
    attempts = Recorder()

    def dead_letters(ev: me.ChangeEvent, sub: str, err: BaseException, n: int) -> None:
        attempts.add(n)
        if len(attempts) < 2:
            raise OSError("dead-letter store unavailable")
        stored.add(ev.id)

    bus = make_bus(client.shop.orders, on_error=hook, dead_letters=dead_letters)
    bus.subscribe(_boom, name="h", max_retries=0, retry_backoff=QUICK)
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    event_id = stored.wait(1)[0]
    failures = [
        (e, c)
        for e, c in seen.wait_until(lambda xs: any(c.kind == "dead_letter" for _, c in xs))
        if c.kind == "dead_letter"
    ]
    error, context = failures[0]
    assert isinstance(error, OSError)
    assert (context.subscription, context.event_id, context.attempt) == ("h", event_id, 1)


class _FailingAcks(me.MemoryAckStore):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    def write(self, records: Sequence[me.AckRecord]) -> None:
        if self.fail:
            raise me.StoreError("ack store down")
        super().write(records)


class _FailingTokens(me.MemoryResumeTokenStore):
    fail = False

    def save(self, key: str, token: Mapping[str, Any], cluster_time: Any = None) -> None:
        if self.fail:
            raise me.StoreError("token store down")
        super().save(key, token, cluster_time)


def test_store_failures_are_reported(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    seen, hook = _recorder()
    acks = _FailingAcks()
    tokens = _FailingTokens()
    bus = make_bus(client.shop.orders, on_error=hook, ack_store=acks, resume_token_store=tokens)
    done = Recorder()
    bus.subscribe(lambda ev: done.add(ev.id), name="h")
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    done.wait(1)
    # Acks are written before the checkpoint, so their failure comes first...
    error, context = seen.wait(1)[0]
    assert (context.kind, context.what, str(error)) == ("store", "write 1 ack record(s)", "ack store down")
    # ... then, with the ack store back and the token store down, the checkpoint's.
    tokens.fail = True
    acks.fail = False
    seen.wait_until(lambda xs: any(c.what == "write checkpoint" for _, c in xs))
    error = next(e for e, c in seen.items if c.what == "write checkpoint")
    assert str(error) == "token store down"
    assert all(c.kind == "store" for _, c in seen.items)
    tokens.fail = False
    assert bus.flush()  # it catches up once the store is back


def test_stream_errors_are_reported(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    seen, hook = _recorder()
    got = Recorder()
    bus = make_bus(client.shop.orders, on_error=hook)
    bus.subscribe(lambda ev: got.add(ev.document_id), name="h")
    bus.start()
    # pymongo resumes once by itself; failing its resume too hands the error to the bus.
    fake_rs.fail("getMore", code=43, message="cursor not found")
    fake_rs.fail("aggregate", code=43, message="cursor not found")
    client.shop.orders.insert_one({"_id": 1})
    assert got.wait(1) == [1]
    error, context = seen.wait(1)[0]
    assert context.kind == "stream"
    assert "cursor not found" in str(error)
    assert context.subscription is None and context.event_id is None


def test_a_fatal_stream_error_is_reported_before_the_bus_fails(make_bus: Any) -> None:
    with FakeReplicaSet(oplog_size=5) as rs:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, serverSelectionTimeoutMS=5000)
        seen, hook = _recorder()
        tokens = me.MemoryResumeTokenStore()
        first = make_bus(client.shop.orders, resume_token_store=tokens, resume_token_id="a")
        first.subscribe(lambda ev: None, name="h")
        first.start()
        client.shop.orders.insert_one({"_id": 0})
        assert first.join(5)
        first.stop()
        client.shop.orders.insert_many([{"_id": i} for i in range(1, 20)])  # the oplog rolls over
        bus = make_bus(client.shop.orders, resume_token_store=tokens, resume_token_id="a", on_error=hook)
        bus.subscribe(lambda ev: None, name="h")
        with pytest.raises(me.ResumeTokenLost):
            bus.start()
        error, context = seen.wait(1)[0]
        assert isinstance(error, me.ResumeTokenLost)
        assert context.kind == "stream"
        client.close()


def test_a_raising_hook_is_logged_and_never_breaks_the_bus(
    client: pymongo.MongoClient[Any], make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    calls = Recorder()

    def hook(error: BaseException, context: me.ErrorContext) -> None:
        calls.add(context.attempt)
        raise RuntimeError("the hook itself is broken")

    ok = Recorder()
    tries = Recorder()

    def flaky(ev: me.ChangeEvent) -> None:
        tries.add(1)
        if len(tries) == 1:
            raise ValueError("first try fails")
        ok.add(ev.document_id)

    bus = make_bus(client.shop.orders, on_error=hook)
    bus.subscribe(flaky, name="h", max_retries=3, retry_backoff=QUICK)
    with caplog.at_level(logging.ERROR, logger="mongo_events.reporting"):
        bus.start()
        client.shop.orders.insert_one({"_id": 1})
        assert ok.wait(1) == [1]
    assert calls.wait(1) == [1]
    assert bus.state is me.BusState.RUNNING
    assert any("on_error hook raised" in r.getMessage() for r in caplog.records)


def test_monitor_write_and_checkpoint_read_failures_are_store_errors(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    from mongo_events.monitor import MemoryMonitorStore

    class DownMonitor(MemoryMonitorStore):
        def write(self, entries: Any) -> None:
            raise me.StoreError("monitor store down")

    seen, hook = _recorder()
    bus = make_bus(client.shop.orders, on_error=hook, monitor=DownMonitor())
    done = Recorder()
    bus.subscribe(lambda ev: done.add(1), name="h")
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    done.wait(1)
    error, context = seen.wait(1)[0]
    assert (context.kind, context.what, str(error)) == (
        "store",
        "write monitor entries",
        "monitor store down",
    )

    class Unreadable(me.MemoryResumeTokenStore):
        def load(self, key: str) -> Any:
            raise me.StoreError("token store unreadable")

    seen2, hook2 = _recorder()
    other = make_bus(client.shop.orders, on_error=hook2, resume_token_store=Unreadable())
    other.subscribe(lambda ev: None, name="h")
    with pytest.raises(me.StoreError):
        other.start()
    error, context = seen2.wait(1)[0]
    assert (context.kind, context.what) == ("store", "read checkpoint")
