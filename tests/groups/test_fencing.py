"""Fenced checkpoint writes: one conditional write on the store, documents the plain store still loads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mongomock
import pymongo
import pytest
from bson.timestamp import Timestamp

from mongo_events import FileResumeTokenStore, MemoryResumeTokenStore, MongoResumeTokenStore, ResumeTokenStore
from mongo_events.groups import FencedOut, FencedResumeTokenStore, MemoryFencedResumeTokenStore, save_fenced
from mongo_events.testing import FakeReplicaSet

from ..conftest import CLIENT_OPTIONS


@pytest.fixture(params=["memory", "mongomock", "fake_rs"])
def store(request: pytest.FixtureRequest) -> Iterator[ResumeTokenStore]:
    if request.param == "memory":
        yield MemoryFencedResumeTokenStore()
    elif request.param == "mongomock":
        yield MongoResumeTokenStore(mongomock.MongoClient().db["_event_resume_tokens"])
    else:
        with FakeReplicaSet() as rs:
            client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
            yield MongoResumeTokenStore(client.db["_event_resume_tokens"])
            client.close()


def test_a_lower_fence_is_refused_and_the_stored_checkpoint_stands(store: ResumeTokenStore) -> None:
    save_fenced(store, "g:db.c#0", {"_data": "01"}, Timestamp(5, 1), 1, namespace="db.c", level="collection")
    save_fenced(store, "g:db.c#0", {"_data": "02"}, Timestamp(6, 1), 2)
    with pytest.raises(FencedOut, match=r"fence 1 .* stored fence is 2"):
        save_fenced(store, "g:db.c#0", {"_data": "03"}, Timestamp(7, 1), 1)
    loaded = store.load("g:db.c#0")
    assert loaded is not None and loaded.token == {"_data": "02"} and loaded.cluster_time == Timestamp(6, 1)
    save_fenced(store, "g:db.c#0", {"_data": "04"}, None, 2)  # the same owner keeps writing
    save_fenced(store, "g:db.c#0", {"_data": "05"}, None, 7)  # a later owner
    loaded = store.load("g:db.c#0")
    assert loaded is not None and loaded.token == {"_data": "05"}


def test_a_checkpoint_written_without_a_fence_is_taken_over(store: ResumeTokenStore) -> None:
    store.save("k", {"_data": "01"})  # a bus before groups, or the Go library
    save_fenced(store, "k", {"_data": "02"}, None, 1)
    loaded = store.load("k")
    assert loaded is not None and loaded.token == {"_data": "02"}


def test_the_wrapper_is_a_resume_token_store_bound_to_a_fence(store: ResumeTokenStore) -> None:
    new, old = FencedResumeTokenStore(store, 3), FencedResumeTokenStore(store, 2)
    new.save("k", {"_data": "aa"})
    with pytest.raises(FencedOut):
        old.save("k", {"_data": "bb"})
    loaded = old.load("k")
    assert loaded is not None and loaded.token == {"_data": "aa"}
    new.delete("k")
    assert new.load("k") is None


def test_mongo_documents_keep_their_shape_plus_the_fence() -> None:
    coll = mongomock.MongoClient().db["_event_resume_tokens"]
    save_fenced(
        MongoResumeTokenStore(coll),
        "k",
        {"_data": "01"},
        Timestamp(5, 1),
        4,
        namespace="db.c",
        level="collection",
    )
    doc = coll.find_one({"_id": "k"})
    assert doc is not None
    assert {k: doc[k] for k in ("token", "cluster_time", "namespace", "level", "fence")} == {
        "token": {"_data": "01"},
        "cluster_time": Timestamp(5, 1),
        "namespace": "db.c",
        "level": "collection",
        "fence": 4,
    }


def test_stores_that_cannot_compare_fences_atomically_are_refused(tmp_path: Any) -> None:
    for plain in (MemoryResumeTokenStore(), FileResumeTokenStore(tmp_path / "t.json")):
        with pytest.raises(TypeError, match="cannot"):
            save_fenced(plain, "k", {"_data": "01"}, None, 1)
        with pytest.raises(TypeError, match="cannot"):
            FencedResumeTokenStore(plain, 1)
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="fence"):
            FencedResumeTokenStore(MemoryFencedResumeTokenStore(), bad)


def test_a_new_owner_raises_the_fence_at_takeover_without_touching_the_token(store: ResumeTokenStore) -> None:
    from mongo_events.groups import raise_fence

    raise_fence(store, "g:db.c#0", 3)  # no checkpoint yet: nothing to fence, nothing created
    assert store.load("g:db.c#0") is None
    save_fenced(store, "g:db.c#0", {"_data": "01"}, Timestamp(5, 1), 1)
    raise_fence(store, "g:db.c#0", 2)  # the new owner took the lease with fence 2
    with pytest.raises(FencedOut):  # the old owner's next write, before any of the new owner's
        save_fenced(store, "g:db.c#0", {"_data": "02"}, Timestamp(6, 1), 1)
    loaded = store.load("g:db.c#0")
    assert loaded is not None and loaded.token == {"_data": "01"} and loaded.cluster_time == Timestamp(5, 1)
    raise_fence(store, "g:db.c#0", 1)  # never lowers it
    with pytest.raises(FencedOut):
        save_fenced(store, "g:db.c#0", {"_data": "03"}, None, 1)
    save_fenced(store, "g:db.c#0", {"_data": "04"}, None, 2)
