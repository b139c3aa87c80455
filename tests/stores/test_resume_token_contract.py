"""Every resume-token store keeps the same contract."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mongomock
import pymongo
import pytest
from bson.timestamp import Timestamp

from mongo_events import (
    FileResumeTokenStore,
    MemoryResumeTokenStore,
    MongoResumeTokenStore,
    ResumeTokenStore,
    StoreError,
)
from mongo_events.testing import FakeReplicaSet

from ..conftest import CLIENT_OPTIONS


@pytest.fixture(params=["memory", "file", "mongomock", "fake_rs"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[ResumeTokenStore]:
    if request.param == "memory":
        yield MemoryResumeTokenStore()
    elif request.param == "file":
        yield FileResumeTokenStore(tmp_path / "tokens.json")
    elif request.param == "mongomock":
        yield MongoResumeTokenStore(mongomock.MongoClient().db["_event_resume_tokens"])
    else:
        with FakeReplicaSet() as rs:
            client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
            yield MongoResumeTokenStore(client.db["_event_resume_tokens"])
            client.close()


def test_load_of_an_unknown_key_is_none(store: ResumeTokenStore) -> None:
    assert store.load("db.coll:host") is None


def test_save_then_load_round_trips_token_and_cluster_time(store: ResumeTokenStore) -> None:
    store.ensure_indexes()
    store.save("db.coll:a", {"_data": "82AA"}, Timestamp(1700000000, 3))
    store.save("db.coll:b", {"_data": "82BB"})
    a = store.load("db.coll:a")
    assert a is not None and a.token == {"_data": "82AA"}
    assert a.cluster_time == Timestamp(1700000000, 3)
    assert a.updated_at is not None
    b = store.load("db.coll:b")
    assert b is not None and b.token == {"_data": "82BB"} and b.cluster_time is None


def test_save_overwrites_and_delete_forgets(store: ResumeTokenStore) -> None:
    store.save("k", {"_data": "1"})
    store.save("k", {"_data": "2"})
    checkpoint = store.load("k")
    assert checkpoint is not None and checkpoint.token == {"_data": "2"}
    store.delete("k")
    assert store.load("k") is None
    store.delete("k")  # deleting twice is fine


def test_mongo_store_uses_the_seed_schema() -> None:
    coll = mongomock.MongoClient().db["_event_resume_tokens"]
    store = MongoResumeTokenStore(coll)
    store.ensure_indexes()
    store.save("shop.orders:host1", {"_data": "82AB"})
    doc = coll.find_one({"_id": "shop.orders:host1"})
    assert doc is not None and doc["token"] == {"_data": "82AB"} and "updated_at" in doc
    assert any(ix["key"] == [("updated_at", 1)] for ix in coll.index_information().values())


def test_mongo_store_failures_raise_store_error_not_none() -> None:
    with FakeReplicaSet() as rs:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        store = MongoResumeTokenStore(client.db["_event_resume_tokens"])
        rs.fail("find", code=13, message="not authorized")
        with pytest.raises(StoreError, match="could not load resume token"):
            store.load("k")
        client.close()


def test_file_store_reports_a_corrupt_file(tmp_path: Any) -> None:
    path = tmp_path / "tokens.json"
    path.write_text("{not json")
    with pytest.raises(StoreError, match="could not read"):
        FileResumeTokenStore(path).load("k")


def test_file_store_writes_atomically(tmp_path: Any) -> None:
    store = FileResumeTokenStore(tmp_path / "tokens.json")
    store.save("k", {"_data": "1"})
    store.save("k", {"_data": "2"})
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "tokens.json"]
    assert leftovers == []  # temporary files were renamed into place
