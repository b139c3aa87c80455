"""The message store's lifecycle contract, through a real pymongo client and the fake replica set."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import mongomock
import pymongo
import pytest

from mongo_events.queue import MessageStore, QueueStats


@pytest.fixture(params=["fake", "mongomock"])
def coll(request: pytest.FixtureRequest) -> Any:
    if request.param == "mongomock":
        return mongomock.MongoClient().db.messages
    client: pymongo.MongoClient[Any] = request.getfixturevalue("client")
    return client.db.messages


def test_lifecycle_pending_inflight_acked(coll: Any) -> None:
    store = MessageStore(coll)
    store.ensure_indexes()
    seq = store.append("order.placed", {"order": 1}, headers={"trace": "t1"})
    doc = coll.find_one()
    assert str(doc["_id"]) == seq
    assert doc["status"] == "pending" and doc["event_name"] == "order.placed" and doc["retry_count"] == 0
    assert doc["data"] == {"order": 1} and isinstance(doc["timestamp"], datetime)

    (msg,) = store.claim("order.placed", owner="c1")
    assert (
        msg.id == seq
        and msg.payload == {"order": 1}
        and msg.headers == {"trace": "t1"}
        and msg.retry_count == 0
    )
    doc = coll.find_one()
    assert doc["status"] == "inflight" and isinstance(doc["inflight_at"], datetime)
    assert store.claim("order.placed", owner="c2") == []  # claimed once only

    assert store.ack("order.placed", seq) == 1
    doc = coll.find_one()
    assert doc["status"] == "acked" and isinstance(doc["acked_at"], datetime) and "inflight_at" not in doc
    assert store.claim("order.placed", owner="c1") == []


def test_nack_returns_to_pending_with_retry_count(coll: Any) -> None:
    store = MessageStore(coll)
    seq = store.append("e", {"n": 1})
    store.claim("e", owner="c1")
    assert store.nack("e", seq)
    doc = coll.find_one()
    assert doc["status"] == "pending" and doc["retry_count"] == 1 and "inflight_at" not in doc
    (again,) = store.claim("e", owner="c2")
    assert again.id == seq and again.retry_count == 1
    assert not store.nack("other-event", seq)


def test_go_weakness_interleaving_nack_m1_ack_m2_m1_still_delivered(coll: Any) -> None:
    """Go's checkpoint moves to the latest acked id and then fetches only _id > checkpoint: m1 is lost there."""
    store = MessageStore(coll)
    m1 = store.append("e", {"n": 1})
    m2 = store.append("e", {"n": 2})
    (c1,) = store.claim("e", owner="a")
    (c2,) = store.claim("e", owner="a")
    assert (c1.id, c2.id) == (m1, m2)
    store.nack("e", m1)
    store.ack("e", m2)
    (again,) = store.claim("e", owner="a")
    assert again.id == m1 and again.retry_count == 1


def test_visibility_timeout_expiry_makes_inflight_claimable(coll: Any) -> None:
    store = MessageStore(coll, visibility_timeout=60)
    seq = store.append("e", {"n": 1})
    store.claim("e", owner="dead")
    assert store.claim("e", owner="alive") == []
    # The holder died a while ago: its inflight_at is older than the visibility timeout.
    coll.update_one({}, {"$set": {"inflight_at": datetime.now(timezone.utc) - timedelta(seconds=61)}})
    (msg,) = store.claim("e", owner="alive", limit=5)
    assert msg.id == seq
    assert coll.find_one()["owner"] == "alive"


def test_touch_keeps_a_held_message_invisible(coll: Any) -> None:
    store = MessageStore(coll, visibility_timeout=60)
    seq = store.append("e", {"n": 1})
    store.claim("e", owner="me")
    coll.update_one({}, {"$set": {"inflight_at": datetime.now(timezone.utc) - timedelta(seconds=61)}})
    assert store.touch([seq], owner="someone-else") == 0
    assert store.touch([seq], owner="me") == 1
    assert store.claim("e", owner="other") == []


def test_batch_claim_and_ordered_keys(coll: Any) -> None:
    store = MessageStore(coll)
    ids = [store.append("e", {"n": i}, key="k1" if i % 2 == 0 else "k2") for i in range(6)]
    free = store.append("e", {"n": 99})
    claimed = store.claim("e", owner="a", limit=10, ordered=True)
    # Only the head of each key, plus the message without a key.
    assert [m.id for m in claimed] == [ids[0], ids[1], free]
    assert store.claim("e", owner="b", limit=10, ordered=True) == []
    store.nack("e", ids[0])  # still the head of k1: nothing behind it moves
    store.ack("e", [ids[1]])
    assert [m.id for m in store.claim("e", owner="b", limit=10, ordered=True)] == [ids[0], ids[3]]
    # Unordered: everything claimable goes.
    rest = store.claim("e", owner="c", limit=10)
    assert [m.id for m in rest] == [ids[2], ids[4], ids[5]]


def test_append_many_and_stats(coll: Any) -> None:
    store = MessageStore(coll)
    ids = store.append_many(
        [("a", {"n": i}, None, None) for i in range(3)] + [("b", {"n": 9}, "k", {"h": 1})]
    )
    assert len(ids) == 4 and [str(d["_id"]) for d in coll.find(sort=[("_id", 1)])] == ids
    store.claim("a", owner="x")
    store.ack("b", ids[3:])
    assert store.stats("a") == QueueStats(pending=2, inflight=1, acked=0, total=3)
    assert store.stats() == QueueStats(pending=2, inflight=1, acked=1, total=4)


def test_purge_deletes_old_acked_only(coll: Any) -> None:
    store = MessageStore(coll)
    old, recent, _pending = (store.append("e", {"n": i}) for i in range(3))
    store.ack("e", [old, recent])
    coll.update_one(
        {"_id": coll.find_one({"data.n": 0})["_id"]},
        {"$set": {"acked_at": datetime.now(timezone.utc) - timedelta(hours=2)}},
    )
    assert store.purge(3600) == 1
    assert sorted(d["data"]["n"] for d in coll.find()) == [1, 2]
    coll.update_one({"data.n": 1}, {"$set": {"acked_at": datetime.now(timezone.utc) - timedelta(minutes=1)}})
    assert store.purge(timedelta(seconds=30)) == 1
    assert [d["data"]["n"] for d in coll.find()] == [2]


def test_ttl_index_only_when_configured(client: pymongo.MongoClient[Any]) -> None:
    coll = client.db.messages  # mongomock drops the partial filter from list_indexes
    MessageStore(coll).ensure_indexes()
    assert not any(i.get("expireAfterSeconds") is not None for i in coll.list_indexes())
    MessageStore(coll, ttl=3600).ensure_indexes()
    (ttl,) = [i for i in coll.list_indexes() if i.get("expireAfterSeconds") is not None]
    assert ttl["key"] == {"acked_at": 1} and ttl["expireAfterSeconds"] == 3600
    assert ttl["partialFilterExpression"] == {"status": "acked"}


def test_invalid_input_is_refused(coll: Any) -> None:
    from mongo_events import ConfigurationError

    store = MessageStore(coll)
    with pytest.raises(ConfigurationError):
        store.append("e", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        store.ack("e", "not-hex")
    with pytest.raises(ConfigurationError):
        MessageStore(coll, visibility_timeout=0)
    assert coll.count_documents({}) == 0
