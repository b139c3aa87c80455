"""Every idempotency store keeps the same contract: memory, MongoDB (mongomock and the fake), real Redis."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import mongomock
import pymongo
import pytest

import mongo_events as me
from mongo_events import ClaimStatus, IdempotencyStore
from mongo_events.testing import FakeReplicaSet

from ..conftest import CLIENT_OPTIONS, wait_for

HOLD = timedelta(minutes=5)
Factory = Callable[..., IdempotencyStore]


@pytest.fixture(params=["memory", "mongomock", "fake_rs", "redis"])
def make_store(request: pytest.FixtureRequest) -> Iterator[Factory]:
    """Builds stores that share one backend (two processes are two stores on one backend)."""
    if request.param == "memory":
        shared = me.MemoryIdempotencyStore(timedelta(hours=1))

        def memory(ttl: timedelta = timedelta(hours=1)) -> IdempotencyStore:
            if ttl != shared.ttl:
                return me.MemoryIdempotencyStore(ttl)
            return shared

        yield memory
        return
    if request.param == "redis":
        client = request.getfixturevalue("redis_client")
        prefix = f"test-{uuid.uuid4().hex[:8]}:"
        yield lambda ttl=timedelta(hours=1): me.RedisIdempotencyStore(client, ttl=ttl, prefix=prefix)
        return
    with contextlib.ExitStack() as stack:
        if request.param == "mongomock":
            collection = mongomock.MongoClient().db.event_idempotency
        else:
            rs = stack.enter_context(FakeReplicaSet())
            client = stack.enter_context(pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS))
            collection = client.db.event_idempotency

        def mongo(ttl: timedelta = timedelta(hours=1)) -> IdempotencyStore:
            store = me.MongoIdempotencyStore(collection, ttl=ttl)
            store.ensure_indexes()
            return store

        yield mongo


def test_claim_then_complete_makes_a_duplicate(make_store: Factory) -> None:
    store = make_store()
    assert store.claim("k1", HOLD) is True
    assert store.try_claim("k1", HOLD).status is ClaimStatus.BUSY  # held: not claimable again
    store.complete("k1")
    assert store.claim("k1", HOLD) is False
    assert store.try_claim("k1", HOLD).status is ClaimStatus.COMPLETED
    assert store.claim("k2", HOLD) is True  # other keys are independent


def test_release_after_a_failure_lets_the_redelivery_run(make_store: Factory) -> None:
    store = make_store()
    assert store.claim("k1", HOLD)
    store.release("k1")  # the handler failed: never marked processed
    assert store.claim("k1", HOLD) is True
    store.complete("k1")
    store.release("k1")  # releasing a completed key changes nothing
    assert store.try_claim("k1", HOLD).status is ClaimStatus.COMPLETED


def test_a_claim_expires_after_processing_ttl(make_store: Factory) -> None:
    store = make_store()
    assert store.claim("k1", timedelta(milliseconds=200))
    assert not store.claim("k1", HOLD)
    # The holder died: after its processing_ttl, someone else may claim it.
    assert wait_for(lambda: store.claim("k1", HOLD), timeout=10, interval=0.05)


def test_a_completed_key_is_forgotten_after_ttl(make_store: Factory) -> None:
    store = make_store(ttl=timedelta(milliseconds=300))
    assert store.claim("k1", HOLD)
    store.complete("k1")
    assert not store.claim("k1", HOLD)
    assert wait_for(lambda: store.claim("k1", HOLD), timeout=10, interval=0.05)


def test_starts_count_claims_that_never_finished(make_store: Factory) -> None:
    store = make_store()
    first = store.try_claim("k1", timedelta(milliseconds=100))
    assert first.status is ClaimStatus.CLAIMED and first.starts == 1
    # The holder died without completing or releasing; the next one claims after expiry.
    second = wait_for(lambda: (c := store.try_claim("k1", HOLD)).claimed and c, timeout=10, interval=0.05)
    assert second.starts == 2
    store.release("k1")  # a normal failure finishes its start
    assert store.try_claim("k1", HOLD).starts == 2
    store.remove("k1")
    assert store.try_claim("k1", HOLD).starts == 1
    store.complete("k1")
    assert store.try_claim("k1", HOLD) == me.Claim(ClaimStatus.COMPLETED, 0)


def test_eight_threads_claiming_one_key_have_exactly_one_winner(make_store: Factory) -> None:
    stores = [make_store() for _ in range(8)]  # as eight processes would
    barrier = threading.Barrier(8, timeout=10)
    results: list[bool] = []
    lock = threading.Lock()

    def claim(store: IdempotencyStore) -> None:
        barrier.wait()
        won = store.claim("race", HOLD)
        with lock:
            results.append(won)

    threads = [threading.Thread(target=claim, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8
    assert results.count(True) == 1


def test_a_failed_handler_is_run_again_by_its_redelivery(make_store: Factory) -> None:
    guard = me.Idempotency(make_store())
    event = me.ChangeEvent.from_raw(
        {
            "_id": {"_data": "82AA"},
            "operationType": "insert",
            "ns": {"db": "d", "coll": "c"},
            "documentKey": {"_id": 1},
        }
    )
    key = guard.claim(event, "sub")
    assert key == "sub:82AA"
    guard.finish(key, RuntimeError("handler failed"))
    again = guard.claim(event, "sub")  # the redelivery runs
    assert again == key
    guard.finish(again, None)
    with pytest.raises(me.Duplicate) as info:
        guard.claim(event, "sub")
    assert info.value.key == "sub:82AA" and guard.duplicates == 1
    other = guard.claim(event, "another-subscription")
    assert other == "another-subscription:82AA"
    guard.finish(other, None)


def _only_the_holder_releases(holder: IdempotencyStore, other: IdempotencyStore) -> None:
    assert holder.claim("k1", HOLD)
    other.release("k1")
    assert not other.claim("k1", HOLD)
    holder.release("k1")
    assert other.claim("k1", HOLD)


# (One memory store is one holder: there is no other memory store to release from.)
def test_only_the_holder_releases_a_mongo_claim(mongo_collection: Callable[[str], Any]) -> None:
    coll = mongo_collection("event_idempotency")
    _only_the_holder_releases(me.MongoIdempotencyStore(coll), me.MongoIdempotencyStore(coll))


def test_only_the_holder_releases_a_redis_claim(redis_client: Any) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    _only_the_holder_releases(
        me.RedisIdempotencyStore(redis_client, prefix=prefix),
        me.RedisIdempotencyStore(redis_client, prefix=prefix),
    )


def test_mongo_store_document_and_ttl_index(mongo_collection: Callable[[str], Any]) -> None:
    coll = mongo_collection("event_idempotency")
    store = me.MongoIdempotencyStore(coll, ttl=timedelta(hours=24))
    store.ensure_indexes()
    assert coll.index_information()["expires_at_ttl"]["expireAfterSeconds"] == 0
    store.claim("k1", HOLD)
    doc = coll.find_one({"_id": "k1"})
    assert (
        doc is not None
        and doc["status"] == "processing"
        and doc["owner"] == store.owner
        and doc["starts"] == 1
    )
    store.complete("k1")
    doc = coll.find_one({"_id": "k1"})
    assert doc is not None and doc["status"] == "completed" and "owner" not in doc
    assert timedelta(hours=23) < doc["expires_at"] - doc["updated_at"] <= timedelta(hours=24)


def test_mongo_store_takes_a_database_and_uses_the_go_collection_name() -> None:
    client: pymongo.MongoClient[Any] = pymongo.MongoClient("mongodb://127.0.0.1:1", connect=False)
    assert me.MongoIdempotencyStore(client.shop).collection.full_name == "shop.event_idempotency"
    client.close()


def test_store_failures_raise_store_error(redis_url: str) -> None:
    import redis

    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    store = me.RedisIdempotencyStore(dead, ttl=timedelta(hours=1))
    with pytest.raises(me.StoreError, match="claim"):
        store.claim("k1", HOLD)


@pytest.mark.parametrize("bad", [timedelta(0), timedelta(seconds=-1)])
def test_ttls_must_be_positive(bad: timedelta) -> None:
    with pytest.raises(ValueError, match="ttl"):
        me.MemoryIdempotencyStore(bad)
    with pytest.raises(ValueError, match="processing_ttl"):
        me.MemoryIdempotencyStore().claim("k", bad)


def test_a_forked_worker_holds_claims_under_its_own_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # A store built before a web server forks is shared by its workers: they must never
    # release each other's claims. (A fork is seen as a change of process id.)
    store = me.MongoIdempotencyStore(mongomock.MongoClient().db.event_idempotency)
    parent = store.owner
    assert store.owner == parent  # stable within a process
    monkeypatch.setattr(os, "getpid", lambda: 424242)
    child = store.owner
    assert child != parent and child.split(":")[1] == "424242"
    assert store.claim("k1", HOLD)
    monkeypatch.undo()
    store.release("k1")  # the parent does not release the child's claim
    assert not store.claim("k1", HOLD)


def test_threads_that_first_use_a_store_together_share_one_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # Workers starting at once name the store at the same moment: each must get the name the
    # others get, or a claim taken under one name is never released under another (seen in
    # CI as a crash counted twice). gethostname() holds every thread until all are inside.
    import socket

    threads = 8
    inside = threading.Barrier(threads, timeout=10)
    real = socket.gethostname

    def gethostname() -> str:
        with contextlib.suppress(threading.BrokenBarrierError):
            inside.wait()
        return real()

    monkeypatch.setattr(socket, "gethostname", gethostname)
    store = me.MongoIdempotencyStore(mongomock.MongoClient().db.event_idempotency)
    names: list[str] = []
    workers = [threading.Thread(target=lambda: names.append(store.owner)) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(10)
    assert len(names) == threads and len(set(names)) == 1, names
    assert store.owner == names[0]


@pytest.mark.parametrize("backend", ["mongomock", "fake_rs"])
def test_a_client_whose_clock_is_ahead_cannot_steal_a_live_claim(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime as dt

    from mongo_events.idempotency import mongodb as mongodb_module

    with contextlib.ExitStack() as stack:
        if backend == "mongomock":
            collection: Any = mongomock.MongoClient().db.event_idempotency
        else:
            rs = stack.enter_context(FakeReplicaSet())
            collection = stack.enter_context(
                pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
            ).db.event_idempotency
        a, b = me.MongoIdempotencyStore(collection), me.MongoIdempotencyStore(collection)  # two hosts
        assert a.try_claim("k", timedelta(minutes=1)).claimed
        real = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        # Host b's clock runs an hour ahead: expiry is the server's business, not b's.
        monkeypatch.setattr(mongodb_module, "_now", lambda: real + timedelta(hours=1), raising=False)
        assert b.try_claim("k", timedelta(minutes=1)).status is ClaimStatus.BUSY
        b.release("k")  # not b's claim: a no-op
        assert b.try_claim("k", timedelta(minutes=1)).status is ClaimStatus.BUSY
        a.complete("k")
        assert b.try_claim("k", timedelta(minutes=1)).status is ClaimStatus.COMPLETED
