"""Either the bus delivers, or it says loudly why not (issue 15).

Each test names the item of issue 15 it proves. Shutdown items (9 to 12) live in
tests/test_shutdown.py, bad-input tables in tests/test_bad_input.py.
"""

from __future__ import annotations

import dataclasses
import decimal
import logging
import threading
import time
import uuid
from typing import Any

import pymongo
import pytest
from bson import Binary, Decimal128
from bson.timestamp import Timestamp

import mongo_events as me
import mongo_events.bus as bus_module
from mongo_events.testing import FakeReplicaSet

from .conftest import CLIENT_OPTIONS, wait_for
from .helpers import QUICK, Recorder

# -- 2. the namespace is stored with the checkpoint; Go-shape documents still load ----------------


def test_the_checkpoint_stores_namespace_and_level_and_go_shape_documents_still_resume(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    coll = client.shop.orders
    tokens = client.shop["_event_resume_tokens"]
    seen = Recorder()
    first = make_bus(coll, resume_token_id="w")
    first.subscribe(lambda ev: seen.add(ev.document_id))
    first.start()
    coll.insert_one({"_id": 1})
    seen.wait(1)
    first.stop()
    doc = tokens.find_one({"_id": "shop.orders:w"})
    assert doc is not None and doc["namespace"] == "shop.orders" and doc["level"] == "collection"

    # Given the document as the Go library writes it: {_id, token, updated_at} only,
    tokens.replace_one({"_id": "shop.orders:w"}, {"token": doc["token"], "updated_at": doc["updated_at"]})
    coll.insert_one({"_id": 2})  # a change while nobody watches
    # when a bus starts on it, then it resumes after the stored token and misses nothing.
    second = make_bus(coll, resume_token_id="w")
    second.subscribe(lambda ev: seen.add(ev.document_id))
    second.start()
    assert seen.wait(2) == [1, 2]


# -- 4. error 280 (the pipeline modified _id) is a configuration error, not history loss ------------


@pytest.mark.parametrize("policy", ["raise", "restart_from_now"])
def test_a_pipeline_that_modifies_id_stops_the_bus_with_a_configuration_error(
    client: pymongo.MongoClient[Any], make_bus: Any, policy: str
) -> None:
    bus = make_bus(client.shop.orders, pipeline=[{"$project": {"_id": 0}}], on_history_lost=policy)
    bus.subscribe(lambda ev: None)
    bus.start()  # the stream opens; the server fails at the first event
    client.shop.orders.insert_one({"_id": 1})
    assert wait_for(lambda: bus.state is me.BusState.FAILED, 10), bus.state
    error = bus.error
    assert isinstance(error, me.ConfigurationError), repr(error)
    assert not isinstance(error, me.ResumeTokenLost)
    assert "must not modify or remove _id" in str(error)
    assert "reset_resume_token" not in str(error)  # the wrong fix is not advised
    assert bus.history_gaps == 0
    assert bus.health().status == "unhealthy"
    with pytest.raises(me.ConfigurationError):
        bus.join(5)


def test_error_280_after_events_were_delivered_stops_the_bus_with_a_stream_error(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    seen = Recorder()
    bus = make_bus(client.shop.orders, on_history_lost="restart_from_now")
    bus.subscribe(lambda ev: seen.add(ev.document_id))
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    seen.wait(1)
    fake_rs.fail(
        "getMore", code=280, message="Encountered an event whose _id field was modified by the pipeline."
    )
    assert wait_for(lambda: bus.state is me.BusState.FAILED, 10), bus.state
    assert type(bus.error) is me.StreamError and "must not modify or remove _id" in str(bus.error)
    assert bus.history_gaps == 0


# -- 5. every owned thread runs under a guard -------------------------------------------------------


def _fails_loudly(bus: me.Bus, caplog: pytest.LogCaptureFixture) -> me.ThreadFailed:
    assert wait_for(lambda: bus.state is me.BusState.FAILED, 10), (
        f"bus is {bus.state.value}: a thread died silently"
    )
    error = bus.error
    assert isinstance(error, me.ThreadFailed), repr(error)
    health = bus.health()
    assert (
        health.status == "unhealthy" and health.last_error is not None and "ThreadFailed" in health.last_error
    )
    failed_lines = [r for r in caplog.records if r.levelno == logging.ERROR and r.msg == "bus %s failed: %s"]
    assert len(failed_lines) == 1, [r.getMessage() for r in failed_lines]
    return error


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_a_callback_raising_systemexit_or_keyboardinterrupt_stops_the_bus_and_is_not_retried(
    client: pymongo.MongoClient[Any],
    make_bus: Any,
    caplog: pytest.LogCaptureFixture,
    exc_type: type[BaseException],
) -> None:
    calls = Recorder()

    def callback(ev: me.ChangeEvent) -> None:
        calls.add(ev.document_id)
        raise exc_type("bye")

    bus = make_bus(client.shop.orders, max_workers=2)
    bus.subscribe(callback, name="quitter", retry_backoff=QUICK)
    bus.start()
    runner_error: list[BaseException] = []
    returned = threading.Event()

    def run() -> None:  # run_forever() must return (raise) when a worker dies
        try:
            bus.run_forever(stop_timeout=5)
        except BaseException as exc:
            runner_error.append(exc)
        returned.set()

    threading.Thread(target=run, daemon=True).start()
    client.shop.orders.insert_one({"_id": 1})
    error = _fails_loudly(bus, caplog)
    assert isinstance(error.__cause__, exc_type)
    assert "quitter" in str(error) and exc_type.__name__ in str(error)
    assert returned.wait(10) and runner_error and runner_error[0] is error
    assert calls.items == [1]  # not retried
    with pytest.raises(me.ThreadFailed):
        bus.join(5)


class Unprintable(Exception):
    def __repr__(self) -> str:
        raise RuntimeError("repr is broken too")

    def __str__(self) -> str:
        raise RuntimeError("str is broken")


class BrokenBackoff:
    def delay(self, attempt: int) -> float:
        raise ZeroDivisionError("a broken retry_backoff")


class BrokenMiddleware(me.Middleware):
    def before_delivery(self, delivery: me.Delivery) -> None:
        raise SystemExit("a middleware bug")


@pytest.mark.parametrize(
    ("case", "options", "subscribe"),
    [
        ("an exception whose repr() raises", {}, {"max_retries": 0}),
        ("a broken retry_backoff", {}, {"retry_backoff": BrokenBackoff()}),
        ("a middleware raising SystemExit", {"middleware": [BrokenMiddleware()]}, {}),
    ],
)
def test_a_worker_that_dies_fails_the_bus(
    client: pymongo.MongoClient[Any],
    make_bus: Any,
    caplog: pytest.LogCaptureFixture,
    case: str,
    options: dict[str, Any],
    subscribe: dict[str, Any],
) -> None:
    def callback(ev: me.ChangeEvent) -> None:
        raise Unprintable()

    bus = make_bus(client.shop.orders, **options)
    bus.subscribe(callback, name="h", **subscribe)
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    error = _fails_loudly(bus, caplog)
    assert "worker" in str(error) and "'h'" in str(error)
    assert bus.checkpoint is None or bus.in_flight >= 0  # the event was not checkpointed past
    with pytest.raises(me.ThreadFailed):
        bus.join(5)


def test_a_watcher_that_dies_fails_the_bus(make_bus: Any, caplog: pytest.LogCaptureFixture) -> None:
    # A history_lost_callback that raises SystemExit used to end the watcher thread silently.
    def quit_on_gap(key: str, since: Any) -> None:
        raise SystemExit("no gaps allowed here")

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
        client.shop.orders.insert_many([{"_id": i} for i in range(1, 20)])  # the oplog rolls over
        bus = make_bus(
            client.shop.orders,
            resume_token_store=store,
            on_history_lost="restart_from_now",
            history_lost_callback=quit_on_gap,
        )
        bus.subscribe(lambda ev: None, name="h")
        with pytest.raises(me.ThreadFailed) as info:
            bus.start()
        assert "watcher" in str(info.value) and isinstance(info.value.__cause__, SystemExit)
        assert bus.state is me.BusState.FAILED and bus.error is info.value
        client.close()


def test_a_bad_option_pymongo_refuses_in_the_watcher_fails_start(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    bus = make_bus(client.shop.orders)
    bus.subscribe(lambda ev: None)
    bus.batch_size = -1  # slipped past validation (set after construction): pymongo raises ValueError
    with pytest.raises(me.ThreadFailed, match="ValueError"):
        bus.start()
    assert bus.state is me.BusState.FAILED


def test_a_flusher_that_dies_fails_the_bus(
    client: pymongo.MongoClient[Any], make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class Quitting(me.MemoryResumeTokenStore):
        def save(self, key: str, token: Any, cluster_time: Any = None, **kwargs: Any) -> None:
            if self.saves:
                raise SystemExit("store gave up")
            super().save(key, token, cluster_time, **kwargs)

    bus = make_bus(client.shop.orders, resume_token_store=Quitting())
    bus.subscribe(lambda ev: None)
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    error = _fails_loudly(bus, caplog)
    assert "flusher" in str(error)


# -- 6. a failed dead-letter write is retried as a write ------------------------------------------------


def test_a_failed_dead_letter_write_is_retried_without_running_the_callback_again(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    calls = Recorder()
    writes = Recorder()
    stored = Recorder()

    def hook(ev: me.ChangeEvent, sub: str, err: BaseException, n: int) -> None:
        writes.add(n)
        if len(writes) < 3:
            raise OSError("dead-letter store unavailable")
        stored.add((ev.document_id, str(err), n))

    def callback(ev: me.ChangeEvent) -> None:
        calls.add(ev.document_id)
        raise ValueError("boom")

    bus = make_bus(client.shop.orders, dead_letters=hook)
    bus.subscribe(callback, name="h", max_retries=1, retry_backoff=QUICK)
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    assert stored.wait(1) == [(1, "boom", 2)]  # the original error and attempt count
    assert writes.items == [2, 2, 2]
    assert calls.items == [1, 1]  # the first attempt and one retry: never again for the write
    assert bus.join(5)


def test_a_dead_letter_store_that_keeps_failing_makes_the_bus_unhealthy(
    client: pymongo.MongoClient[Any], make_bus: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The event stays undone while its dead-letter write fails, so the window fills and
    # delivery stops: health must say so, not stay "healthy" with no error.
    monkeypatch.setattr(bus_module, "DEAD_LETTER_STALL", 0.0)
    store_ok = threading.Event()
    writes = Recorder()

    def hook(ev: me.ChangeEvent, sub: str, err: BaseException, n: int) -> None:
        writes.add(n)
        if not store_ok.is_set():
            raise OSError("dead-letter store unavailable")

    def callback(ev: me.ChangeEvent) -> None:
        raise ValueError("boom")

    bus = make_bus(client.shop.orders, dead_letters=hook)
    bus.subscribe(callback, name="h", max_retries=0, retry_backoff=QUICK)
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    assert writes.wait(2)
    health = bus.health()
    assert health.status == "unhealthy" and bus.state is me.BusState.RUNNING
    assert health.last_error is not None and "dead-letter" in health.last_error
    store_ok.set()
    assert bus.join(5)  # the write went through: the event is done
    assert bus.health().status != "unhealthy"


# -- 8. decoding ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Priced:
    price: decimal.Decimal
    ref: uuid.UUID


def test_decimal128_and_binary_uuids_decode_with_the_default_converter() -> None:
    ref = uuid.uuid4()
    decoded = me.CattrsDecoder().decode({"price": Decimal128("19.99"), "ref": Binary.from_uuid(ref)}, Priced)
    assert decoded == Priced(decimal.Decimal("19.99"), ref)
    assert me.CattrsDecoder().decode({"price": "1.5", "ref": str(ref)}, Priced) == Priced(
        decimal.Decimal("1.5"), ref
    )


def test_decode_errors_name_the_field_path() -> None:
    with pytest.raises(me.DecodeError) as info:
        me.CattrsDecoder().decode({"price": "not a number", "ref": Binary(b"short", 0)}, Priced)
    assert any("$.price" in e for e in info.value.errors), info.value.errors
    assert any("$.ref" in e for e in info.value.errors), info.value.errors


@dataclasses.dataclass
class Order:
    sku: str
    qty: int


def test_a_payload_that_looks_like_the_document_says_full_document_only(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    errors = Recorder()
    bus = make_bus(client.shop.orders, dead_letters=lambda ev, sub, err, n: errors.add(err))
    bus.subscribe(lambda order: None, payload=Order, name="orders")
    bus.start()
    client.shop.orders.insert_one({"_id": 1, "sku": "a", "qty": 2})
    (error,) = errors.wait(1)
    assert isinstance(error, me.DecodeError)
    assert "payload= decodes the change event" in str(error) and "full_document_only=True" in str(error)


# -- 13. a bus that cannot connect is unhealthy and says so at ERROR ---------------------------------------


def test_a_bus_that_cannot_open_its_stream_is_unhealthy_and_logs_errors(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(
        "mongodb://127.0.0.1:1/?directConnection=true", serverSelectionTimeoutMS=100
    )
    bus = make_bus(client.shop.orders, resume=False, start_timeout=0.3)
    bus.subscribe(lambda ev: None)
    with caplog.at_level(logging.WARNING, logger="mongo_events"):
        bus.start()  # web apps boot while the database is down: it keeps trying in the background
        assert bus.state is me.BusState.RUNNING
        assert bus.health().status == "unhealthy"
        assert wait_for(
            lambda: bus.health().last_error and "ServerSelectionTimeoutError" in bus.health().last_error, 10
        ), bus.health()
        assert bus.health().status == "unhealthy"
        errors = [
            r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("mongo_events")
        ]
        assert any("cannot open" in r.getMessage() for r in errors), [r.getMessage() for r in errors]
    bus.stop(timeout=1)
    client.close()


# -- 14. checkpoint age is measured from the stored checkpoint --------------------------------------------


def test_checkpoint_age_follows_the_stored_idle_token_not_the_last_event(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    coll = client.shop.orders
    with coll.watch() as stream:
        coll.insert_one({"_id": "long ago"})
        assert stream.try_next() is not None
        token = stream.resume_token
    assert token is not None
    store = me.MemoryResumeTokenStore()
    # The shape a quiet stream leaves: a fresh post-batch token, stored with the cluster
    # time of the last event, a day ago.
    day_ago = Timestamp(int(time.time()) - 86400, 1)
    store.save("shop.orders:w", token, day_ago)
    bus = make_bus(coll, resume_token_store=store, resume_token_id="w")
    bus.subscribe(lambda ev: None)
    bus.start()
    age = bus.checkpoint_age()
    assert age is not None and age < 3600, age
    headroom = bus.health().oplog_headroom  # the fake serves local.oplog.rs
    assert headroom is not None and headroom >= 0, headroom
    # Changes elsewhere move the post-batch token; the bus stores it while idle.
    saves = store.saves
    client.shop.other.insert_one({"_id": 1})
    assert wait_for(lambda: store.saves > saves, 30)  # idle tokens are written every 10 s
    stored = store.load("shop.orders:w")
    assert stored is not None and stored.token != token
    age = bus.health().checkpoint_age
    assert age is not None and age < 3600, age
