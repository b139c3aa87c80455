"""Bad input is refused where it is given, with an error that names it (issue 15).

One table per kind of input: bus options, subscribe() options and operations, payload
types, stored checkpoints. Each row says which error and what the message must name.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import mongomock
import pymongo
import pytest

import mongo_events as me

KEY = "shop.orders:w"


@pytest.fixture
def offline() -> Iterator[pymongo.MongoClient[Any]]:
    """A client that never connects: construction and subscribe() need no server."""
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(
        "mongodb://127.0.0.1:1", connect=False, serverSelectionTimeoutMS=100
    )
    yield client
    client.close()


# -- Bus options ------------------------------------------------------------------------------

BAD_BUS_OPTIONS = [
    ("full_document", "updatelookup", "updateLookup"),
    ("full_document", 1, "updateLookup"),
    ("full_document_before_change", "always", "whenAvailable"),
    ("full_document_only", "yes", "True or False"),
    ("max_workers", "8", "int"),
    ("max_workers", 2.5, "int"),
    ("max_workers", True, "int"),
    ("max_workers", 0, "at least 1"),
    ("max_in_flight", -5, "at least 1"),
    ("batch_size", -1, "at least 0"),
    ("batch_size", "100", "int"),
    ("max_await_time", -1, "seconds"),
    ("max_await_time", "1s", "seconds"),
    ("flush_interval", 0, "> 0"),
    ("start_timeout", "10", "seconds"),
    ("max_updated_fields_size", -1, "at least 0"),
    ("ack_store", object(), "AckStore"),
    ("ack_store", me.MemoryDeadLetterStore(), "AckStore"),
    ("dead_letters", 42, "DeadLetterStore"),
    ("resume_token_store", {"k": "v"}, "ResumeTokenStore"),
    ("resume_token_collection", 42, "Collection"),
    ("resume_token_id", "", "non-empty"),
    ("start_from_past", 3600, "timedelta"),
    ("decoder", object(), "decode()"),
    ("middleware", [object()], "Middleware"),
    ("middleware", me.Middleware(), "Middleware"),
    ("ordering", "random", "document"),
    ("coalesce", "yes", "True or False"),
    ("coalesce", 1, "True or False"),
    ("coalesce", None, "True or False"),
    ("on_history_lost", "ignore", "restart_from_now"),
    ("history_lost_callback", "print", "function"),
    ("metrics", object(), "Metrics"),
    ("monitor", object(), "MonitorStore"),
    ("pipeline", {"$match": {}}, "list of stages"),
    ("pipeline", [{"$match": {}, "$project": {}}], "one-key"),
    ("name", 7, "str"),
]


@pytest.mark.parametrize(
    ("option", "value", "accepted"), BAD_BUS_OPTIONS, ids=[f"{o}={v!r}" for o, v, _ in BAD_BUS_OPTIONS]
)
def test_bad_bus_options_are_refused_naming_the_option(
    offline: pymongo.MongoClient[Any], option: str, value: Any, accepted: str
) -> None:
    with pytest.raises(me.ConfigurationError) as info:
        me.Bus(offline.shop.orders, **{option: value})
    message = str(info.value)
    assert f"{option}=" in message, message  # names the option and the value ...
    assert accepted in message, message  # ... and what it accepts


def test_good_values_of_the_same_options_are_accepted(offline: pymongo.MongoClient[Any]) -> None:
    bus = me.Bus(
        offline.shop.orders,
        full_document="updateLookup",
        max_workers=2,
        batch_size=0,
        max_await_time=timedelta(seconds=2),
        flush_interval=0.5,
        ack_store=me.MemoryAckStore(),
        dead_letters=lambda event, subscription, error, attempts: None,
        resume_token_collection="tokens",
        decoder=me.CattrsDecoder(),
        middleware=[me.Middleware()],
    )
    assert bus.full_document is me.FullDocument.UPDATE_LOOKUP and bus.max_workers == 2


# -- subscribe() options and operations ----------------------------------------------------------


@dataclasses.dataclass
class Order:
    sku: str
    qty: int


class NotStructurable:
    def __init__(self, anything: object) -> None:
        self.anything = anything


BAD_SUBSCRIBE_OPTIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"operations": {"insrt"}}, "operations=", "insrt"),
    ({"operations": "insert"}, "operations=", "{'insert'}"),  # a bare string is not a set of its letters
    ({"operations": ["createIndexes"]}, "operations=", "show_expanded_events=True"),
    ({"operations": [1]}, "operations=", "insert"),
    ({"operations": set()}, "operations=", "at least one"),
    ({"operations": {"Insert"}}, "operations=", "case-sensitive"),
    ({"max_retries": -1}, "max_retries=", "at least 0"),
    ({"max_retries": "5"}, "max_retries=", "int"),
    ({"retry_backoff": "fast"}, "retry_backoff=", "RetryBackoff"),
    ({"on_exhausted": "ignore"}, "on_exhausted=", "'skip'"),
    ({"name": 3}, "name=", "str"),
    ({"payload": NotStructurable}, "payload=", "NotStructurable"),
    ({"payload": "Order"}, "payload=", "dataclass"),
]


@pytest.mark.parametrize(
    ("options", "names", "accepted"), BAD_SUBSCRIBE_OPTIONS, ids=[str(o) for o, _, _ in BAD_SUBSCRIBE_OPTIONS]
)
def test_bad_subscribe_options_are_refused_naming_the_option(
    offline: pymongo.MongoClient[Any], options: dict[str, Any], names: str, accepted: str
) -> None:
    bus = me.Bus(offline.shop.orders)
    with pytest.raises(me.ConfigurationError) as info:
        bus.subscribe(lambda ev: None, **options)
    message = str(info.value)
    assert names in message and accepted in message, message
    assert bus.subscriptions == ()


def test_operations_list_the_valid_names(offline: pymongo.MongoClient[Any]) -> None:
    bus = me.Bus(offline.shop.orders)
    with pytest.raises(me.ConfigurationError) as info:
        bus.subscribe(lambda ev: None, operations={"insrt"})
    for name in ("insert", "update", "replace", "delete", "drop", "rename", "dropDatabase", "invalidate"):
        assert name in str(info.value)


def test_valid_operations_and_expanded_events_are_accepted(offline: pymongo.MongoClient[Any]) -> None:
    bus = me.Bus(offline.shop.orders)
    sub_ops = bus.subscribe(lambda ev: None, operations=[me.OperationType.INSERT, "delete"], name="a")
    assert sub_ops is not None and bus.subscriptions[0].operations == frozenset({"insert", "delete"})
    ddl = me.Bus(offline.shop.orders, show_expanded_events=True)
    ddl.subscribe(lambda ev: None, operations={"createIndexes", "insert"})
    assert ddl.subscriptions[0].operations == frozenset({"createIndexes", "insert"})
    typed = me.Bus(offline.shop.orders)
    typed.subscribe(lambda order: None, payload=Order)  # a dataclass the converter can build


# -- stored checkpoints -----------------------------------------------------------------------

MALFORMED_MONGO_DOCS = [
    ({"_id": KEY, "token": {}}, "no _data"),
    ({"_id": KEY, "token": []}, "list"),
    ({"_id": KEY, "token": "8200000001"}, "str"),
    ({"_id": KEY}, "no token"),
    ({"_id": KEY, "token": None}, "no token"),
    ({"_id": KEY, "token": {"data": "82AB"}}, "no _data"),
    ({"_id": KEY, "token": {"_data": 5}}, "int"),
]


@pytest.mark.parametrize(
    ("doc", "problem"),
    MALFORMED_MONGO_DOCS,
    ids=[repr(d.get("token", "<missing>")) for d, _ in MALFORMED_MONGO_DOCS],
)
def test_a_malformed_mongo_checkpoint_fails_start_and_is_left_untouched(
    offline: pymongo.MongoClient[Any], doc: dict[str, Any], problem: str
) -> None:
    coll = mongomock.MongoClient().db.tokens
    coll.insert_one(dict(doc))
    bus = me.Bus(offline.shop.orders, resume_token_store=me.MongoResumeTokenStore(coll), resume_token_id="w")
    bus.subscribe(lambda ev: None)
    with pytest.raises(me.StoreError) as info:
        bus.start()
    message = str(info.value)
    assert KEY in message and "db.tokens" in message and problem in message, message
    assert coll.find_one({"_id": KEY}) == doc  # not overwritten with "now"
    assert bus.state is me.BusState.FAILED and bus.error is info.value


MALFORMED_FILE_ENTRIES = [
    ({}, "no token"),
    (None, "None"),
    ("82AB", "'82AB'"),
    ({"cluster_time": None}, "no token"),
    ({"token": {}}, "no _data"),
]


@pytest.mark.parametrize(
    ("entry", "problem"), MALFORMED_FILE_ENTRIES, ids=[repr(e) for e, _ in MALFORMED_FILE_ENTRIES]
)
def test_a_malformed_file_checkpoint_fails_start_and_is_left_untouched(
    offline: pymongo.MongoClient[Any], tmp_path: Path, entry: Any, problem: str
) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({KEY: entry}))
    before = path.read_text()
    bus = me.Bus(offline.shop.orders, resume_token_store=me.FileResumeTokenStore(path), resume_token_id="w")
    bus.subscribe(lambda ev: None)
    with pytest.raises(me.StoreError) as info:
        bus.start()
    message = str(info.value)
    assert KEY in message and str(path) in message and problem in message, message
    assert path.read_text() == before
    assert bus.state is me.BusState.FAILED


def test_only_a_missing_document_or_key_means_no_checkpoint(tmp_path: Path) -> None:
    coll = mongomock.MongoClient().db.tokens
    assert me.MongoResumeTokenStore(coll).load(KEY) is None
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"other:key": {"token": {"_data": "82AB"}}}))
    assert me.FileResumeTokenStore(path).load(KEY) is None


def test_a_checkpoint_of_another_namespace_is_refused(offline: pymongo.MongoClient[Any]) -> None:
    store = me.MemoryResumeTokenStore()
    store.save(KEY, {"_data": "82AB"}, namespace="shop.invoices", level="collection")  # a copied document
    bus = me.Bus(offline.shop.orders, resume_token_store=store, resume_token_id="w")
    bus.subscribe(lambda ev: None)
    with pytest.raises(me.StoreError) as info:
        bus.start()
    assert "shop.invoices" in str(info.value) and "shop.orders" in str(info.value) and KEY in str(info.value)
    assert bus.state is me.BusState.FAILED
    checkpoint = store.load(KEY)
    assert checkpoint is not None and checkpoint.namespace == "shop.invoices"


def test_a_checkpoint_of_another_watch_level_is_refused(offline: pymongo.MongoClient[Any]) -> None:
    store = me.MemoryResumeTokenStore()
    store.save("shop.*:w", {"_data": "82AB"}, namespace="shop.*", level="collection")
    bus = me.Bus(offline.shop, resume_token_store=store, resume_token_id="w")
    bus.subscribe(lambda ev: None)
    with pytest.raises(me.StoreError, match="database watch"):
        bus.start()


def test_a_start_that_fails_never_leaves_the_bus_starting(offline: pymongo.MongoClient[Any]) -> None:
    class Exploding(me.MemoryResumeTokenStore):
        def load(self, key: str) -> me.Checkpoint | None:
            raise RuntimeError("a bug in a custom store")

    bus = me.Bus(offline.shop.orders, resume_token_store=Exploding())
    bus.subscribe(lambda ev: None)
    with pytest.raises(RuntimeError):
        bus.start()
    assert bus.state is me.BusState.FAILED and isinstance(bus.error, RuntimeError)
    assert not bus.health().healthy
    bus.stop(timeout=0.1)  # returns at once: nothing runs
