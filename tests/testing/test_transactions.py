"""Transactions in the fake replica set, against a real server wherever one exists.

Inserts inside a transaction are invisible until it commits and vanish when it aborts;
a transaction that did more than insert cannot abort on the fake (263, documented).
"""

from __future__ import annotations

from typing import Any

import pymongo
import pytest
from pymongo.errors import OperationFailure

from mongo_events.testing import FakeReplicaSet

from ..conftest import CLIENT_OPTIONS


def _prepare(client: pymongo.MongoClient[Any]) -> None:
    # Collections exist before the transaction (servers before 4.4 cannot create them in one).
    client.shop.orders.insert_one({"_id": "setup"})
    client.shop.messages.insert_one({"_id": "setup"})


def test_inserts_are_invisible_until_commit_and_then_one_change_each(
    server_client: pymongo.MongoClient[Any],
) -> None:
    _prepare(server_client)
    shop = server_client.shop
    with shop.watch(max_await_time_ms=50) as stream:
        with server_client.start_session() as session:
            session.start_transaction()
            shop.orders.insert_one({"_id": 1}, session=session)
            shop.messages.insert_one({"_id": "m1", "order": 1}, session=session)
            assert shop.orders.find_one({"_id": 1}) is None  # outside the transaction: not yet
            assert shop.messages.count_documents({}) == 1
            session.commit_transaction()
        assert shop.orders.find_one({"_id": 1}) == {"_id": 1}
        events = [stream.next(), stream.next()]
    assert [(e["ns"]["coll"], e["documentKey"]["_id"]) for e in events] == [("orders", 1), ("messages", "m1")]
    assert all("lsid" in e and "txnNumber" in e for e in events)
    assert events[0]["txnNumber"] == events[1]["txnNumber"]


def test_an_aborted_transaction_leaves_no_document_and_no_change(
    server_client: pymongo.MongoClient[Any],
) -> None:
    _prepare(server_client)
    shop = server_client.shop
    with shop.watch(max_await_time_ms=50) as stream:
        with server_client.start_session() as session:
            session.start_transaction()
            shop.orders.insert_one({"_id": 2}, session=session)
            shop.messages.insert_many([{"_id": "m2"}, {"_id": "m3"}], session=session)
            session.abort_transaction()
        shop.orders.insert_one({"_id": "after"})
        event = stream.next()
    assert event["documentKey"] == {"_id": "after"}  # nothing of the aborted transaction
    assert shop.orders.find_one({"_id": 2}) is None
    assert shop.messages.count_documents({}) == 1


def test_a_duplicate_id_inside_a_transaction_fails_at_the_insert(
    server_client: pymongo.MongoClient[Any],
) -> None:
    _prepare(server_client)
    shop = server_client.shop
    with server_client.start_session() as session:
        session.start_transaction()
        shop.orders.insert_one({"_id": 3}, session=session)
        with pytest.raises(pymongo.errors.DuplicateKeyError):
            shop.orders.insert_one({"_id": 3}, session=session)
        with pytest.raises(OperationFailure):  # the failed write aborted the transaction
            session.commit_transaction()
    assert shop.orders.find_one({"_id": 3}) is None


def test_the_fake_refuses_to_abort_a_transaction_whose_writes_it_applied(
    fake_rs: FakeReplicaSet, caplog: pytest.LogCaptureFixture
) -> None:
    # An update inside the transaction runs at once on the fake: its abort answers 263
    # instead of pretending to roll back (a real server would roll it back). pymongo's
    # abort_transaction() ignores every error, so the fake says it in its log.
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(fake_rs.uri, **CLIENT_OPTIONS)
    try:
        _prepare(client)
        with client.start_session() as session:
            session.start_transaction()
            client.shop.orders.insert_one({"_id": 4}, session=session)
            client.shop.orders.update_one({"_id": 4}, {"$set": {"paid": True}}, session=session)
            with caplog.at_level("ERROR", logger="mongo_events.testing"):
                session.abort_transaction()
        assert any("cannot roll back" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        assert client.shop.orders.find_one({"_id": 4}) == {"_id": 4, "paid": True}
    finally:
        client.close()
