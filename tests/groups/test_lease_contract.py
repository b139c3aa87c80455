"""Every lease store keeps the same contract: memory, mongomock (with the fake's expressions), and the fake through pymongo."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import attrs
import mongomock
import pymongo
import pytest

import mongo_events.testing  # noqa: F401 - installs $$NOW in mongomock's evaluator (mongomock alone matches nothing)
from mongo_events import StoreError
from mongo_events.groups import (
    GroupConfig,
    GroupMismatch,
    LeaseStore,
    MemoryLeaseStore,
    MongoLeaseStore,
    Owner,
    PartitionMode,
)
from mongo_events.testing import FakeReplicaSet

from ..conftest import CLIENT_OPTIONS, wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@attrs.define
class Subject:
    store: LeaseStore
    #: Let ``ttl`` seconds pass on the store's clock; returns how to wait for expiry.
    pass_time: Callable[[float], None]
    ttl: float
    raw: Any = None  # the pymongo-like collection, for Mongo stores


@pytest.fixture(params=["memory", "mongomock", "fake_rs"])
def subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    yield from _subject(request.param)


@pytest.fixture(params=["mongomock", "fake_rs"])
def mongo_subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    yield from _subject(request.param)


def _subject(kind: str) -> Iterator[Subject]:
    if kind == "memory":
        clock = FakeClock()

        def advance(seconds: float) -> None:
            clock.now += seconds

        yield Subject(MemoryLeaseStore(clock), advance, 10.0)
        return

    def nothing(seconds: float) -> None:
        """Real stores expire by the server's clock: callers wait for the effect with a bound."""

    if kind == "mongomock":
        coll = mongomock.MongoClient().db["_event_leases"]
        yield Subject(MongoLeaseStore(coll), nothing, 0.2, coll)
        return
    with FakeReplicaSet() as rs:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        yield Subject(MongoLeaseStore(client.db["_event_leases"]), nothing, 0.2, client.db["_event_leases"])
        client.close()


A = Owner("host-a", 1, "a" * 32)
B = Owner("host-b", 2, "b" * 32)


def take_after_expiry(s: Subject, key: str, owner: Owner) -> Any:
    s.pass_time(s.ttl * 1.01)
    return wait_for(lambda: s.store.acquire(key, owner, 30.0), timeout=10)


def test_a_free_key_is_taken_with_fence_1(subject: Subject) -> None:
    lease = subject.store.acquire("g:db.c#0", A, subject.ttl)
    assert lease is not None and (lease.owner, lease.fence) == (A, 1)
    assert subject.store.fence("g:db.c#0") == 1
    assert subject.store.fence("never") == 0


def test_a_held_key_is_refused_to_another_owner(subject: Subject) -> None:
    assert subject.store.acquire("k", A, 30.0) is not None
    assert subject.store.acquire("k", B, 30.0) is None
    assert subject.store.live("k") == {"k": A}


def test_reacquiring_ones_own_live_lease_keeps_the_fence(subject: Subject) -> None:
    first = subject.store.acquire("k", A, 30.0)
    again = subject.store.acquire("k", A, 30.0)
    assert first is not None and again is not None and again.fence == first.fence == 1


def test_an_expired_lease_goes_to_the_next_owner_with_a_higher_fence(subject: Subject) -> None:
    old = subject.store.acquire("k", A, subject.ttl)
    assert old is not None
    new = take_after_expiry(subject, "k", B)
    assert new is not None and new.owner == B and new.fence == old.fence + 1
    assert subject.store.renew(old, 30.0) is False  # the old owner learns it lost the lease
    assert subject.store.renew(new, 30.0) is True
    assert subject.store.live("") == {"k": B}


def test_renewal_keeps_a_lease_alive(subject: Subject) -> None:
    lease = subject.store.acquire("k", A, 30.0)
    assert lease is not None and subject.store.renew(lease, 30.0)
    subject.pass_time(20.0)
    assert subject.store.renew(lease, 30.0)
    subject.pass_time(20.0)  # 40 s after taking it, 20 s after the renewal
    assert subject.store.acquire("k", B, 30.0) is None
    assert subject.store.fence("k") == 1


def test_release_hands_over_at_once_and_the_fence_still_grows(subject: Subject) -> None:
    lease = subject.store.acquire("k", A, 30.0)
    assert lease is not None
    subject.store.release(lease)
    assert subject.store.live("") == {}
    taken = subject.store.acquire("k", B, 30.0)
    assert taken is not None and taken.fence == 2
    subject.store.release(lease)  # a stale release changes nothing
    assert subject.store.live("") == {"k": B}
    again = subject.store.acquire("k", A, 30.0)
    assert again is None


def test_live_lists_only_held_unexpired_leases_under_a_prefix(subject: Subject) -> None:
    assert subject.store.acquire("g/members/a", A, 30.0) is not None
    assert subject.store.acquire("g/members/b", B, subject.ttl) is not None
    assert subject.store.acquire("h/members/a", A, 30.0) is not None
    assert set(subject.store.live("g/members/")) == {"g/members/a", "g/members/b"}
    subject.pass_time(subject.ttl * 1.01)
    assert wait_for(lambda: subject.store.live("g/members/") == {"g/members/a": A}, timeout=10)


def test_forget_deletes_only_what_expired_long_enough_under_the_prefix(subject: Subject) -> None:
    ttl = subject.ttl
    gone = subject.store.acquire("g:db.c/members/gone", A, ttl)
    assert gone is not None
    assert subject.store.acquire("g:db.c#0", A, ttl) is not None  # a partition: same age
    assert subject.store.acquire("h:db.c/members/other", A, ttl) is not None  # another group
    assert subject.store.forget("g:db.c/members/", 2 * ttl) == 0  # all still live
    assert subject.store.acquire("g:db.c/members/live", B, 100 * ttl) is not None
    subject.pass_time(ttl * 3.5)
    # Expired 2.5 ttls ago (by the store's clock): forgotten; the live one and the others kept
    assert wait_for(lambda: subject.store.forget("g:db.c/members/", 2 * ttl) == 1, timeout=10)
    assert subject.store.live("g:db.c/members/") == {"g:db.c/members/live": B}
    assert subject.store.fence("g:db.c#0") == 1 and subject.store.fence("h:db.c/members/other") == 1
    assert subject.store.fence("g:db.c/members/gone") == 0  # gone, not released


def test_the_group_document_refuses_a_mismatch(subject: Subject) -> None:
    config = GroupConfig("billing", 8, PartitionMode.SERVER)
    assert subject.store.join_group(config) == config
    assert subject.store.join_group(config) == config
    with pytest.raises(GroupMismatch, match="partitions=8"):
        subject.store.join_group(GroupConfig("billing", 4, PartitionMode.SERVER))
    with pytest.raises(GroupMismatch, match="mode='server'"):
        subject.store.join_group(GroupConfig("billing", 8, PartitionMode.CLIENT))
    assert subject.store.join_group(GroupConfig("other", 4, PartitionMode.CLIENT)).partitions == 4


def test_a_group_is_a_name_and_a_namespace(subject: Subject) -> None:
    orders = GroupConfig("web", 4, PartitionMode.SERVER, namespace="shop.orders")
    invoices = GroupConfig("web", 1, PartitionMode.CLIENT, namespace="shop.invoices")
    assert (orders.document_key, invoices.document_key) == (
        "group:web:shop.orders",
        "group:web:shop.invoices",
    )
    assert subject.store.join_group(orders) == orders  # neither is checked against the other
    assert subject.store.join_group(invoices) == invoices
    with pytest.raises(GroupMismatch) as caught:
        subject.store.join_group(GroupConfig("web", 2, PartitionMode.SERVER, namespace="shop.orders"))
    message = str(caught.value)  # names the group, its target and how to change it
    assert "'web' on shop.orders has partitions=4" in message
    assert "'group:web:shop.orders'" in message and "Changing a group's partitions" in message


def test_a_malformed_group_document_is_refused_as_a_mismatch(mongo_subject: Subject) -> None:
    # Fatal at start (GroupMismatch), not a store failure a member would retry at every poll.
    assert mongo_subject.raw is not None
    mongo_subject.raw.insert_one({"_id": "group:billing", "partitions": "eight", "mode": "server"})
    with pytest.raises(GroupMismatch, match="malformed"):
        mongo_subject.store.join_group(GroupConfig("billing", 8, PartitionMode.SERVER))


def test_bad_ttls_are_refused(subject: Subject) -> None:
    for bad in (0, -1.0, float("inf"), float("nan"), True, "10"):
        with pytest.raises(ValueError, match="ttl"):
            subject.store.acquire("k", A, bad)  # type: ignore[arg-type]


def test_mongo_lease_documents_and_server_clock(mongo_subject: Subject) -> None:
    subject = mongo_subject
    assert subject.store.acquire("k", A, 2.5) is not None
    doc = subject.raw.find_one({"_id": "k"})
    assert doc["owner"] == {"host": "host-a", "pid": 1, "id": "a" * 32}
    assert (doc["fence"], doc["ttl_ms"]) == (1, 2500)
    assert doc["renewed_at"] is not None  # set by $currentDate, the server's clock
    # A lease whose server-side renewal time lies far in the past is expired, whatever this host's clock says.
    subject.raw.update_one({"_id": "k"}, {"$set": {"renewed_at": doc["renewed_at"].replace(year=2000)}})
    taken = subject.store.acquire("k", B, 30.0)
    assert taken is not None and taken.fence == 2


def test_a_failing_backend_raises_store_error() -> None:
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(
        "mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=100"
    )
    store = MongoLeaseStore(client.db["_event_leases"])
    with pytest.raises(StoreError, match="acquire lease"):
        store.acquire("k", A, 10.0)
    with pytest.raises(StoreError):
        store.live("")
    client.close()
