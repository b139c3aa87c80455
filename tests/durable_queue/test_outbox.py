"""The transactional outbox: ``publish(..., session=s)`` inside the caller's transaction.

The abort test runs on the fake replica set (which buffers a transaction's inserts until
it commits, see ``mongo_events.testing.transactions``) and on real MongoDB wherever it exists.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pymongo
import pytest

from mongo_events.queue import Queue
from mongo_events.testing import FakeReplicaSet

from ..conftest import CLIENT_OPTIONS, wait_for
from ..helpers import Recorder


class Boom(Exception):
    pass


def _place_order(client: pymongo.MongoClient[Any], queue: Queue, order_id: int, fail: bool) -> None:
    db = client.shop
    with client.start_session() as session:
        with session.start_transaction():
            db.orders.insert_one({"_id": order_id}, session=session)
            queue.publish("order.placed", {"order_id": order_id}, session=session)
            if fail:
                raise Boom("the view failed after publishing")
    queue.notify("order.placed")


def test_publish_in_a_committed_transaction_is_delivered(client: pymongo.MongoClient[Any]) -> None:
    got = Recorder()
    queue = Queue(client.shop.messages, poll_interval=0.05)
    queue.subscribe(lambda p: got.add(p["order_id"]), event="order.placed")
    with queue:
        _place_order(client, queue, 1, fail=False)
        assert got.wait(1) == [1]


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.mongodb)])
def outbox_client(request: pytest.FixtureRequest) -> Iterator[pymongo.MongoClient[Any]]:
    if request.param == "fake":
        with FakeReplicaSet() as rs:
            c: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
            yield c
            c.close()
        return
    c = pymongo.MongoClient(request.getfixturevalue("real_mongodb_uri"))
    c.drop_database("shop")
    c.shop.create_collection("orders")
    c.shop.create_collection("messages")  # a transaction cannot create collections before 4.4
    yield c
    c.close()


def test_publish_in_an_aborted_transaction_is_never_delivered(
    outbox_client: pymongo.MongoClient[Any],
) -> None:
    got = Recorder()
    queue = Queue(outbox_client.shop.messages, poll_interval=0.05)
    queue.subscribe(lambda p: got.add(p["order_id"]), event="order.placed")
    with queue:
        with pytest.raises(Boom):
            _place_order(outbox_client, queue, 1, fail=True)
        _place_order(outbox_client, queue, 2, fail=False)
        assert got.wait(1) == [2]
        assert wait_for(lambda: queue.stats().acked == 1)
    assert outbox_client.shop.orders.count_documents({}) == 1
    assert queue.stats().total == 1  # the aborted message never existed
    assert got.items == [2]
