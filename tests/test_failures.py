"""Failure handling: handler retries and stream errors, through the fake replica set."""

from __future__ import annotations

import threading
from typing import Any

import pymongo
import pytest
from pymongo.errors import AutoReconnect, CursorNotFound, OperationFailure

import mongo_events as me
from mongo_events.testing import FakeReplicaSet

from .conftest import CLIENT_OPTIONS, wait_for
from .helpers import QUICK, Recorder, fail_command, wait_for_fail_point

# -- classification ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (AutoReconnect("connection reset"), me.ErrorKind.RESUMABLE),
        (CursorNotFound("cursor gone", 43), me.ErrorKind.RESUMABLE),
        (OperationFailure("x", 91, {"errorLabels": ["ResumableChangeStreamError"]}), me.ErrorKind.RESUMABLE),
        (OperationFailure("not primary", 10107), me.ErrorKind.RESUMABLE),
        (OperationFailure("lost", 286), me.ErrorKind.HISTORY_LOST),
        (OperationFailure("bad token", 260), me.ErrorKind.HISTORY_LOST),
        (OperationFailure("fatal", 280), me.ErrorKind.FATAL),  # the pipeline modified _id: not history loss
        (OperationFailure("too large", 10334), me.ErrorKind.OVERSIZE),
        (OperationFailure("standalone", 40573), me.ErrorKind.CONFIGURATION),
        (OperationFailure("auth", 18), me.ErrorKind.CONFIGURATION),
        (OperationFailure("unauthorized", 13), me.ErrorKind.CONFIGURATION),
        (OperationFailure("bad stage", 40324), me.ErrorKind.CONFIGURATION),
        (OperationFailure("something else", 12345), me.ErrorKind.FATAL),
        (ValueError("not a driver error"), me.ErrorKind.FATAL),
    ],
)
def test_classify_error(exc: BaseException, kind: me.ErrorKind) -> None:
    assert me.classify_error(exc) is kind


# -- handler failures ------------------------------------------------------------------------


def test_failing_handler_is_retried_then_succeeds(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    attempts = Recorder()
    bus = make_bus(client.shop.orders)

    @bus.subscribe(max_retries=3, retry_backoff=QUICK)
    def flaky(ev: me.ChangeEvent, d: me.Delivery) -> None:
        attempts.add(d.attempt)
        if d.attempt < 3:
            raise RuntimeError("not yet")

    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    assert attempts.wait(3) == [1, 2, 3]
    assert bus.join(5)


def test_retries_do_not_block_other_documents(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    others = Recorder()
    failing = threading.Event()
    bus = make_bus(client.shop.orders, max_workers=1)  # one worker: a sleeping retry would block everything

    @bus.subscribe(max_retries=1000, retry_backoff=me.RetryBackoff(min=0.05, max=0.05, jitter=False))
    def handle(ev: me.ChangeEvent) -> None:
        if ev.document_id == "poison":
            failing.set()
            raise RuntimeError("always fails")
        others.add(ev.document_id)

    bus.start()
    client.shop.orders.insert_one({"_id": "poison"})
    assert failing.wait(5)
    client.shop.orders.insert_many([{"_id": i} for i in range(20)])
    assert others.wait(20) == list(range(20))


def test_retry_with_delay_and_reject(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    dead = Recorder()
    seen = Recorder()
    bus = make_bus(
        client.shop.orders,
        dead_letters=lambda ev, sub, err, n: dead.add((ev.document_id, sub, type(err).__name__, n)),
    )

    @bus.subscribe(name="h", max_retries=5, retry_backoff=QUICK)
    def handle(ev: me.ChangeEvent, d: me.Delivery) -> None:
        seen.add((ev.document_id, d.attempt))
        if ev.document_id == "later" and d.attempt == 1:
            raise me.Retry(delay=0.01)
        if ev.document_id == "bad":
            raise me.Reject("bad order")

    bus.start()
    client.shop.orders.insert_one({"_id": "later"})
    client.shop.orders.insert_one({"_id": "bad"})
    assert dead.wait(1) == [("bad", "h", "Reject", 1)]  # no retries after Reject
    seen.wait_until(lambda items: ("later", 2) in items)
    assert ("bad", 2) not in seen.items


def test_exhausted_retries_go_to_the_dead_letter_hook_and_count_as_done(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    dead = Recorder()
    bus = make_bus(
        client.shop.orders, dead_letters=lambda ev, sub, err, n: dead.add((ev.document_id, str(err), n))
    )
    bus.subscribe(
        lambda ev: (_ for _ in ()).throw(ValueError("boom")), name="h", max_retries=2, retry_backoff=QUICK
    )
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    assert dead.wait(1) == [(1, "boom", 3)]
    assert bus.join(5)
    assert bus.flush()
    assert bus.in_flight == 0  # done, and the stored checkpoint covers it


def test_dead_letter_hook_failure_keeps_the_event_undone(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    calls = Recorder()
    stored = Recorder()
    store = me.MemoryResumeTokenStore()
    allow = threading.Event()  # the third write waits for it: the checks below see it undone

    def hook(ev: me.ChangeEvent, sub: str, err: BaseException, n: int) -> None:
        calls.add(n)
        if len(calls) < 3:
            raise OSError("dead-letter store unavailable")
        assert allow.wait(10)
        stored.add(ev.document_id)

    bus = make_bus(client.shop.orders, dead_letters=hook, resume_token_store=store)
    bus.subscribe(
        lambda ev: (_ for _ in ()).throw(ValueError("boom")), name="h", max_retries=0, retry_backoff=QUICK
    )
    bus.start()
    bus.flush()
    before = store.load(bus.resume_token_key)
    client.shop.orders.insert_one({"_id": 1})
    assert len(calls.wait(3)) == 3  # two writes failed, the third is under way
    bus.flush()
    assert store.load(bus.resume_token_key) == before  # not past the event while its dead letter is unwritten
    allow.set()
    assert stored.wait(1) == [1]
    assert bus.join(5)


def test_on_exhausted_skip_goes_on(
    client: pymongo.MongoClient[Any], make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ok = Recorder()
    bus = make_bus(client.shop.orders)

    @bus.subscribe(max_retries=1, retry_backoff=QUICK, on_exhausted="skip")
    def handle(ev: me.ChangeEvent) -> None:
        if ev.document_id == 1:
            raise ValueError("boom")
        ok.add(ev.document_id)

    bus.start()
    client.shop.orders.insert_many([{"_id": 1}, {"_id": 2}])
    assert ok.wait(1) == [2]
    assert bus.join(5)
    assert any("skipped" in r.message and r.levelname == "ERROR" for r in caplog.records)


def test_on_exhausted_stop_fails_the_bus_and_keeps_the_checkpoint_before_the_event(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    store = me.MemoryResumeTokenStore()
    bus = make_bus(client.shop.orders, resume_token_store=store)
    bus.subscribe(
        lambda ev: (_ for _ in ()).throw(ValueError("boom")), name="h", max_retries=1, retry_backoff=QUICK
    )
    bus.start()
    bus.flush()
    before = store.load(bus.resume_token_key)
    client.shop.orders.insert_one({"_id": 1})
    with pytest.raises(me.HandlerFailed, match="gave up on event") as info:
        bus.run_forever()
    assert info.value.subscription == "h"
    assert isinstance(info.value.__cause__, ValueError)
    assert bus.state is me.BusState.FAILED and bus.error is info.value
    assert store.load(bus.resume_token_key) == before
    # A restart retries the event.
    again = Recorder()
    bus2 = make_bus(client.shop.orders, resume_token_store=store)
    bus2.subscribe(lambda ev: again.add(ev.document_id), name="h")
    bus2.start()
    assert again.wait(1) == [1]


def test_stop_during_retries_interrupts_the_wait_and_the_event_is_redelivered(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    store = me.MemoryResumeTokenStore()
    failed = threading.Event()
    bus = make_bus(client.shop.orders, resume_token_store=store)

    @bus.subscribe(name="h", max_retries=5, retry_backoff=me.RetryBackoff(min=60, max=60))
    def handle(ev: me.ChangeEvent) -> None:
        failed.set()
        raise RuntimeError("down")

    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    assert failed.wait(5)
    bus.stop(timeout=5)  # returns without waiting out the 60 s backoff (the test timeout guards it)
    assert bus.state is me.BusState.STOPPED
    again = Recorder()
    bus2 = make_bus(client.shop.orders, resume_token_store=store)
    bus2.subscribe(lambda ev: again.add(ev.document_id), name="h")
    bus2.start()
    assert again.wait(1) == [1]


# -- stream errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "times"),
    [
        # pymongo resumes once by itself, and retries a read once after a network or
        # shutdown error: failing those too makes each error reach the watcher.
        ({"closeConnection": True}, 3),
        ({"errorCode": 43}, 2),  # CursorNotFound: resumed, but an aggregate failing with it is not retried
        ({"errorCode": 91, "errorLabels": ["ResumableChangeStreamError"]}, 3),
    ],
    ids=["dropped-connection", "cursor-not-found", "resumable-label"],
)
def test_stream_errors_reopen_and_lose_nothing(
    server_client: pymongo.MongoClient[Any], make_bus: Any, fault: dict[str, Any], times: int
) -> None:
    client = server_client
    rec = Recorder()
    bus = make_bus(client.shop.orders, max_workers=2)
    bus.subscribe(lambda ev: rec.add(ev.document_id))
    bus.start()
    client.shop.orders.insert_many([{"_id": i} for i in range(5)])
    rec.wait(5)
    with fail_command(client, {"times": times}, failCommands=["getMore", "aggregate"], **fault) as armed:
        client.shop.orders.insert_many([{"_id": i} for i in range(5, 10)])
        wait_for_fail_point(client, armed, times)
    got = rec.wait(10)
    assert sorted(got) == list(range(10))
    assert wait_for(
        lambda: bus.reconnections == 1
    )  # the error reached the watcher, which reopened the stream


def test_step_down_reconnects_and_loses_nothing(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    rec = Recorder()
    bus = make_bus(client.shop.orders)
    bus.subscribe(lambda ev: rec.add(ev.document_id))
    bus.start()
    client.shop.orders.insert_one({"_id": 0})
    rec.wait(1)
    fake_rs.step_down(0.5)
    other: pymongo.MongoClient[Any] = pymongo.MongoClient(fake_rs.uri, **CLIENT_OPTIONS)
    other.shop.orders.insert_many([{"_id": i} for i in range(1, 6)])  # waits for the primary to return
    assert sorted(rec.wait(6)) == list(range(6))
    other.close()


@pytest.mark.parametrize("ordering", ["stream", "document"])
def test_invalidate_is_delivered_then_the_stream_continues(
    client: pymongo.MongoClient[Any], make_bus: Any, ordering: str
) -> None:
    coll = client.shop.orders
    coll.insert_one({"_id": 0})
    everything, data = Recorder(), Recorder()
    # Under "document" too: the drop and the invalidate (no document key) are barriers.
    bus = make_bus(coll, ordering=ordering)
    bus.subscribe(lambda ev: everything.add(str(ev.operation_type)), name="all")
    bus.subscribe(lambda ev: data.add(ev.document_id), name="data", operations={"insert"})
    bus.start()
    coll.insert_one({"_id": 1})
    coll.drop()
    everything.wait(3)
    coll.insert_one({"_id": 2})
    got = everything.wait(4)
    assert got == ["insert", "drop", "invalidate", "insert"]
    assert data.wait(2) == [1, 2]
    assert bus.join(5)
    bus.flush()
    assert bus.checkpoint is not None


def test_history_lost_raises_resume_token_lost_by_default(make_bus: Any) -> None:
    with FakeReplicaSet(oplog_size=5) as rs:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        store = me.MemoryResumeTokenStore()
        bus = make_bus(client.shop.orders, resume_token_store=store, resume_token_id="w")
        rec = Recorder()
        bus.subscribe(lambda ev: rec.add(ev.document_id))
        bus.start()
        client.shop.orders.insert_one({"_id": 0})
        rec.wait(1)
        bus.stop()
        client.shop.orders.insert_many([{"_id": i} for i in range(1, 20)])  # the oplog rolls over
        bus2 = make_bus(client.shop.orders, resume_token_store=store, resume_token_id="w")
        bus2.subscribe(lambda ev: None)
        with pytest.raises(me.ResumeTokenLost) as info:
            bus2.start()
        assert info.value.key == "shop.orders:w"
        assert "shop.orders:w" in str(info.value) and "reset_resume_token" in str(info.value)
        assert store.load("shop.orders:w") is not None  # the position is kept for an operator to decide
        client.close()


def test_history_lost_restart_from_now_reports_the_gap_once(make_bus: Any) -> None:
    with FakeReplicaSet(oplog_size=5) as rs:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        store = me.MemoryResumeTokenStore()
        first = make_bus(client.shop.orders, resume_token_store=store)
        seen = Recorder()
        first.subscribe(lambda ev: seen.add(ev.document_id), name="h")
        first.start()
        client.shop.orders.insert_one({"_id": 0})
        seen.wait(1)
        first.stop()
        checkpoint = store.load(first.resume_token_key)
        assert checkpoint is not None
        client.shop.orders.insert_many([{"_id": i} for i in range(1, 20)])
        gaps = Recorder()
        rec = Recorder()
        bus = make_bus(
            client.shop.orders,
            resume_token_store=store,
            on_history_lost="restart_from_now",
            history_lost_callback=lambda key, since: gaps.add((key, since)),
        )
        bus.subscribe(lambda ev: rec.add(ev.document_id), name="h")
        bus.start()
        client.shop.orders.insert_one({"_id": "after"})
        assert rec.wait(1) == ["after"]
        assert gaps.items == [(bus.resume_token_key, checkpoint.cluster_time)]
        assert bus.history_gaps == 1
        client.close()


def test_a_failed_token_load_is_an_error_not_a_fresh_start(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    class Broken(me.MemoryResumeTokenStore):
        def load(self, key: str) -> me.Checkpoint | None:
            raise me.StoreError("token store unreachable")

    store = Broken()
    bus = make_bus(client.shop.orders, resume_token_store=store)
    bus.subscribe(lambda ev: None)
    with pytest.raises(me.StoreError, match="unreachable"):
        bus.start()
    assert store.saves == 0  # it never wrote "now" over the stored position


@pytest.mark.parametrize(
    ("code", "message", "match"),
    [(18, "Authentication failed.", "authentication failed"), (13, "not authorized", "not authorised")],
)
def test_start_fails_fast_on_auth_errors(
    server_client: pymongo.MongoClient[Any], make_bus: Any, code: int, message: str, match: str
) -> None:
    bus = make_bus(server_client.shop.orders, resume=False)
    bus.subscribe(lambda ev: None)
    with (
        fail_command(server_client, {"times": 1}, failCommands=["aggregate"], errorCode=code),
        pytest.raises(me.ConfigurationError, match=match),
    ):
        bus.start()


def test_start_fails_fast_on_an_invalid_pipeline(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    bus = make_bus(client.shop.orders, resume=False, pipeline=[{"$group": {"_id": None}}])
    bus.subscribe(lambda ev: None)
    with pytest.raises(me.ConfigurationError, match="does not allow"):
        bus.start()


def test_oversize_events_are_split_and_reassembled(make_bus: Any) -> None:
    with FakeReplicaSet(max_event_size=2000) as rs:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        coll = client.shop.orders
        rec = Recorder()
        bus = make_bus(coll, full_document=me.FullDocument.UPDATE_LOOKUP, ordering="stream")
        bus.subscribe(rec.add)
        bus.start()
        coll.insert_one({"_id": "small"})
        coll.insert_one({"_id": "big", "a": "x" * 1500, "b": "y" * 1500})
        coll.insert_one({"_id": "after"})
        got = rec.wait(3)
        assert [e.document_id for e in got] == ["small", "big", "after"]
        big = got[1]
        assert big.full_document == {"_id": "big", "a": "x" * 1500, "b": "y" * 1500}
        assert big.operation_type is me.OperationType.INSERT and "splitEvent" not in big.raw
        assert bus.join(5)
        client.close()


def test_oversize_events_a_server_cannot_split_are_dead_lettered_as_stubs(make_bus: Any) -> None:
    with FakeReplicaSet(max_event_size=2000, supports_split=False) as rs:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        coll = client.shop.orders
        rec, dead = Recorder(), Recorder()
        bus = make_bus(coll, dead_letters=lambda ev, sub, err, n: dead.add((ev, sub, err)), ordering="stream")
        bus.subscribe(lambda ev: rec.add(ev.document_id), name="h")
        bus.start()
        coll.insert_one({"_id": "small"})
        coll.insert_one({"_id": "big", "a": "x" * 3000})
        coll.insert_one({"_id": "after"})
        assert rec.wait(2) == ["small", "after"]
        ((stub, sub, err),) = dead.wait(1)
        assert stub.document_key == {"_id": "big"} and stub.full_document is None
        assert sub.endswith(":oversize") and "exceeds 16 MB" in str(err)
        assert bus.oversize_events == 1
        client.close()


def _raw_bson(coll: pymongo.collection.Collection[Any]) -> pymongo.collection.Collection[Any]:
    from bson.raw_bson import RawBSONDocument

    return coll.with_options(codec_options=coll.codec_options.with_options(document_class=RawBSONDocument))


def test_oversize_events_read_as_raw_bson_are_reassembled_and_stubbed_as_plain_documents(
    make_bus: Any,
) -> None:
    """Split fragments and the stub of an unsplittable event, read as RawBSONDocument, reach
    callbacks and the dead-letter hook as plain, decoded events."""
    with FakeReplicaSet(max_event_size=2000) as rs:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        rec = Recorder()
        bus = make_bus(_raw_bson(client.shop.orders), full_document=me.FullDocument.UPDATE_LOOKUP)
        bus.subscribe(rec.add)
        bus.start()
        client.shop.orders.insert_one({"_id": "big", "a": "x" * 1500, "b": "y" * 1500})
        (big,) = rec.wait(1)
        assert big.full_document == {"_id": "big", "a": "x" * 1500, "b": "y" * 1500}
        assert type(big.full_document) is dict and type(big.raw) is dict and "splitEvent" not in big.raw
        bus.stop()
        client.close()
    with FakeReplicaSet(max_event_size=2000, supports_split=False) as rs:
        client = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        rec, dead = Recorder(), Recorder()
        bus = make_bus(_raw_bson(client.shop.orders), dead_letters=lambda ev, sub, err, n: dead.add(ev))
        bus.subscribe(lambda ev: rec.add(ev.document_id), name="h")
        bus.start()
        client.shop.orders.insert_one({"_id": "big", "a": "x" * 3000})
        client.shop.orders.insert_one({"_id": "after"})
        assert rec.wait(1) == ["after"]
        (stub,) = dead.wait(1)
        assert stub.document_key == {"_id": "big"} and type(stub.document_key) is dict
        assert stub.full_document is None and type(stub.raw) is dict
        client.close()
