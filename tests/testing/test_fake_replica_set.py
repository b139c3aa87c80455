"""The fake replica set behaves like MongoDB, as seen through a real pymongo client.

Tests taking ``server_uri`` run against the fake and, wherever one exists, a real
replica set, so the fake is checked against MongoDB itself. Fault injection,
oplog size and restarts exist only on the fake.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
import uuid
from typing import Any

import pymongo
import pytest
from bson import ObjectId
from bson.timestamp import Timestamp
from pymongo import monitoring
from pymongo.errors import OperationFailure

from mongo_events.testing import FakeReplicaSet

from ..conftest import CLIENT_OPTIONS


class Listener(monitoring.CommandListener):
    def __init__(self) -> None:
        self.commands: list[dict[str, Any]] = []
        self.names: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names.append(event.command_name)
        self.commands.append(event.command)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def of(self, name: str) -> list[dict[str, Any]]:
        return [c for n, c in zip(self.names, self.commands, strict=True) if n == name]


def _client(uri: str, **kw: Any) -> pymongo.MongoClient[Any]:
    return pymongo.MongoClient(uri, **{**CLIENT_OPTIONS, **kw})


def _drain(stream: Any, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        doc = stream.try_next()
        if doc is not None:
            out.append(doc)
        elif not stream.alive:
            break
    return out


@pytest.fixture
def db_name() -> str:
    return f"t_{uuid.uuid4().hex[:8]}"


def test_collection_watch_sees_each_event_type_with_documented_fields(server_uri: str, db_name: str) -> None:
    c = _client(server_uri)
    coll = c[db_name]["orders"]
    coll.insert_one({"_id": 0})  # the collection exists before the stream opens
    with coll.watch(max_await_time_ms=100) as stream:
        coll.insert_one({"_id": 1, "a": {"b": 1}, "tags": [1, 2, 3]})
        coll.update_one({"_id": 1}, {"$set": {"a.b": 2, "n": 5}, "$unset": {"tags": ""}})
        coll.replace_one({"_id": 1}, {"x": 1})
        coll.delete_one({"_id": 1})
        coll.drop()
        events = _drain(stream, 6)
    ops = [e["operationType"] for e in events]
    assert ops == ["insert", "update", "replace", "delete", "drop", "invalidate"]
    ins, upd, rep, dele, drop, inv = events
    for e in events:
        assert isinstance(e["_id"]["_data"], str)
        assert isinstance(e["clusterTime"], Timestamp)
    times = [(e["clusterTime"].time, e["clusterTime"].inc) for e in events[:5]]
    assert times == sorted(times) and len(set(times)) == 5
    assert ins["ns"] == {"db": db_name, "coll": "orders"}
    assert ins["documentKey"] == {"_id": 1}
    assert ins["fullDocument"] == {"_id": 1, "a": {"b": 1}, "tags": [1, 2, 3]}
    assert isinstance(ins["wallTime"], datetime.datetime)
    assert upd["updateDescription"]["updatedFields"] == {"a.b": 2, "n": 5}
    assert upd["updateDescription"]["removedFields"] == ["tags"]
    assert upd["updateDescription"]["truncatedArrays"] == []
    assert "fullDocument" not in upd
    assert rep["fullDocument"] == {"_id": 1, "x": 1}
    assert dele["documentKey"] == {"_id": 1} and "fullDocument" not in dele
    assert drop["ns"] == {"db": db_name, "coll": "orders"} and "documentKey" not in drop
    assert set(inv) >= {"_id", "operationType", "clusterTime"}
    c.close()


def test_truncated_arrays_and_nested_paths(server_uri: str, db_name: str) -> None:
    # Only pipeline updates report truncatedArrays (MongoDB's change-events reference).
    c = _client(server_uri)
    coll = c[db_name]["items"]
    coll.insert_one({"_id": 1, "arr": [1, 2, 3, 4], "o": {"p": {"q": 1}}})
    with coll.watch(max_await_time_ms=100) as stream:
        coll.update_one({"_id": 1}, [{"$set": {"arr": {"$slice": ["$arr", 2]}, "o.p.q": 2}}])
        (upd,) = _drain(stream, 1)
    desc = upd["updateDescription"]
    assert desc["truncatedArrays"] == [{"field": "arr", "newSize": 2}]
    assert desc["updatedFields"] == {"o.p.q": 2}
    c.close()


def test_database_and_cluster_watch(server_uri: str, db_name: str) -> None:
    c = _client(server_uri)
    db = c[db_name]
    db["a"].insert_one({"_id": 0})
    with db.watch(max_await_time_ms=100) as dbs, c.watch(max_await_time_ms=100) as cluster:
        db["a"].insert_one({"_id": 1})
        db["b"].insert_one({"_id": 2})
        db["a"].rename("c")
        got = _drain(dbs, 3)
        assert [(e["operationType"], e["ns"].get("coll")) for e in got] == [
            ("insert", "a"),
            ("insert", "b"),
            ("rename", "a"),
        ]
        assert got[2]["to"] == {"db": db_name, "coll": "c"}
        c.drop_database(db_name)
        rest = _drain(dbs, 4)
        assert [e["operationType"] for e in rest][-2:] == ["dropDatabase", "invalidate"]
        assert rest[-2]["ns"] == {"db": db_name}
        seen = [e for e in _drain(cluster, 6) if e.get("ns", {}).get("db") == db_name]
        assert [e["operationType"] for e in seen][:3] == ["insert", "insert", "rename"]
        assert "invalidate" not in [e["operationType"] for e in seen]
    c.close()


def test_update_lookup_returns_the_current_document(server_uri: str, db_name: str) -> None:
    c = _client(server_uri)
    coll = c[db_name]["orders"]
    coll.insert_one({"_id": 1, "n": 0})
    with coll.watch(full_document="updateLookup", max_await_time_ms=100) as stream:
        coll.update_one({"_id": 1}, {"$inc": {"n": 1}})
        coll.update_one({"_id": 1}, {"$inc": {"n": 1}})
        first, second = _drain(stream, 2)
    # The lookup happens when the event is read, so both see the latest version.
    assert first["fullDocument"] == {"_id": 1, "n": 2}
    assert second["fullDocument"] == {"_id": 1, "n": 2}
    c.close()


def test_start_at_operation_time_replays_from_that_time(server_uri: str, db_name: str) -> None:
    c = _client(server_uri)
    coll = c[db_name]["orders"]
    coll.insert_one({"_id": "before"})
    reply = c[db_name].command("ping")
    at = reply["operationTime"]
    coll.insert_one({"_id": 1})
    coll.insert_one({"_id": 2})
    with coll.watch(start_at_operation_time=Timestamp(at.time, at.inc + 1), max_await_time_ms=100) as stream:
        got = _drain(stream, 2)
    assert [e["documentKey"]["_id"] for e in got] == [1, 2]
    c.close()


def test_invalidate_then_start_after_continues(server_uri: str, db_name: str) -> None:
    c = _client(server_uri)
    coll = c[db_name]["orders"]
    coll.insert_one({"_id": 1})
    with coll.watch(max_await_time_ms=100) as stream:
        coll.drop()
        _drop, inv = _drain(stream, 2)
        assert inv["operationType"] == "invalidate"
        assert not stream.alive
    coll.insert_one({"_id": 2})
    with pytest.raises(OperationFailure) as info:
        with coll.watch(resume_after=inv["_id"], max_await_time_ms=100) as s:
            s.try_next()
    assert info.value.code == 260
    with coll.watch(start_after=inv["_id"], max_await_time_ms=100) as stream:
        (ins,) = _drain(stream, 1)
    assert ins["operationType"] == "insert" and ins["documentKey"] == {"_id": 2}
    c.close()


def test_get_more_waits_for_max_time_and_returns_post_batch_token(server_uri: str, db_name: str) -> None:
    listener = Listener()
    c = _client(server_uri, event_listeners=[listener])
    coll = c[db_name]["orders"]
    coll.insert_one({"_id": 0})
    with coll.watch(max_await_time_ms=300) as stream:
        stream.try_next()  # the first getMore
        start = time.monotonic()
        assert stream.try_next() is None
        waited = time.monotonic() - start
        token = stream.resume_token
    assert waited >= 0.2  # it blocked server-side rather than answering at once
    assert token is not None and "_data" in token
    assert listener.of("getMore")[-1]["maxTimeMS"] == 300
    c.close()


def test_lsid_and_txn_number_for_transaction_writes(server_uri: str, db_name: str) -> None:
    c = _client(server_uri)
    coll = c[db_name]["orders"]
    coll.insert_one({"_id": 0})
    with coll.watch(max_await_time_ms=100) as stream:
        coll.insert_one({"_id": 1})
        with c.start_session() as s, s.start_transaction():
            coll.insert_one({"_id": 2}, session=s)
        plain, txn = _drain(stream, 2)
    assert "lsid" not in plain and "txnNumber" not in plain
    assert "id" in txn["lsid"] and txn["txnNumber"] >= 1
    c.close()


def test_crud_bulk_write_find_one_and_update_and_indexes(server_uri: str, db_name: str) -> None:
    c = _client(server_uri)
    coll = c[db_name]["things"]
    coll.insert_many([{"_id": i, "n": i} for i in range(5)])
    result = coll.bulk_write(
        [
            pymongo.UpdateOne({"_id": 10}, {"$set": {"n": 10}}, upsert=True),
            pymongo.ReplaceOne({"_id": 1}, {"n": 100}),
            pymongo.DeleteOne({"_id": 2}),
            pymongo.InsertOne({"_id": 11, "n": 11}),
        ]
    )
    assert (result.upserted_count, result.modified_count, result.deleted_count, result.inserted_count) == (
        1,
        1,
        1,
        1,
    )
    doc = coll.find_one_and_update(
        {"n": {"$gte": 10}},
        {"$inc": {"n": 1}},
        sort=[("n", -1)],
        return_document=pymongo.ReturnDocument.AFTER,
    )
    assert doc == {"_id": 1, "n": 101}
    assert coll.find_one_and_update(
        {"_id": 99}, {"$set": {"n": 0}}, upsert=True, return_document=pymongo.ReturnDocument.AFTER
    ) == {"_id": 99, "n": 0}
    r = coll.update_one({"_id": 50}, {"$setOnInsert": {"created": True}}, upsert=True)
    assert r.upserted_id == 50
    coll.update_many({"n": {"$lt": 5}}, [{"$set": {"small": True}}])  # a pipeline update
    assert coll.count_documents({"small": True}) == 4
    assert [d["_id"] for d in coll.find({}, sort=[("_id", 1)], limit=3)] == [0, 1, 3]
    assert len(list(coll.find({}, batch_size=2))) == coll.count_documents({})
    keyed = c[db_name]["keyed"]
    keyed.create_index("sku", unique=True, name="sku_unique")
    keyed.create_index([("created_at", 1)], expireAfterSeconds=3600, name="ttl")
    names = {ix["name"]: ix for ix in keyed.list_indexes()}
    assert names["sku_unique"]["unique"] is True
    assert names["ttl"]["expireAfterSeconds"] == 3600
    keyed.insert_one({"sku": "a"})
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        keyed.insert_one({"sku": "a"})
    assert list(coll.aggregate([{"$match": {"n": {"$gte": 10}}}, {"$count": "k"}])) == [{"k": 3}]
    assert db_name in c.list_database_names()
    assert "things" in c[db_name].list_collection_names()
    c.close()


# -- fake-only: faults, oplog bounds, restarts ---------------------------------------


def test_resumes_after_dropped_connection_with_last_token_and_loses_nothing() -> None:
    listener = Listener()
    with FakeReplicaSet() as rs:
        c = _client(rs.uri, event_listeners=[listener])
        coll = c.db.orders
        coll.insert_one({"_id": 0})
        with coll.watch(max_await_time_ms=100) as stream:
            coll.insert_many([{"_id": i} for i in range(1, 4)])
            first = _drain(stream, 3)
            held = stream.resume_token
            rs.drop_connection("getMore")
            coll.insert_many([{"_id": i} for i in range(4, 7)])
            rest = _drain(stream, 3)
        assert [e["documentKey"]["_id"] for e in first + rest] == [1, 2, 3, 4, 5, 6]
        aggregates = listener.of("aggregate")
        assert len(aggregates) == 2
        assert aggregates[1]["pipeline"][0]["$changeStream"]["resumeAfter"] == held
        c.close()


def test_history_lost_token_raises_286_and_closes_the_stream() -> None:
    with FakeReplicaSet(oplog_size=5) as rs:
        c = _client(rs.uri)
        coll = c.db.orders
        coll.insert_one({"_id": 0})
        with coll.watch(max_await_time_ms=100) as stream:
            coll.insert_one({"_id": 1})
            (old,) = _drain(stream, 1)
        coll.insert_many([{"_id": i} for i in range(2, 12)])
        with pytest.raises(OperationFailure) as info:
            with coll.watch(resume_after=old["_id"], max_await_time_ms=100) as s:
                s.try_next()
        assert info.value.code == 286
        with pytest.raises(OperationFailure) as bad:
            with coll.watch(resume_after={"_data": "not-a-token"}) as s:
                s.try_next()
        assert bad.value.code == 260
        # A cursor that falls off the oplog while open also gets 286, and is closed.
        stream = coll.watch(max_await_time_ms=100)
        rs.fail("getMore", code=286, message="history lost")
        with pytest.raises(OperationFailure) as live:
            stream.try_next()
        assert live.value.code == 286 and not stream.alive
        c.close()


def test_injected_errors_delays_step_down_and_counters() -> None:
    with FakeReplicaSet() as rs:
        c = _client(rs.uri, retryWrites=False)
        rs.fail("insert", code=2, message="injected", labels=["SomeLabel"])
        with pytest.raises(OperationFailure) as info:
            c.db.x.insert_one({"_id": 1})
        assert info.value.code == 2 and info.value.has_error_label("SomeLabel")
        c.db.x.insert_one({"_id": 1})  # only the next one failed
        rs.delay("find", 0.3)
        start = time.monotonic()
        c.db.x.find_one({})
        assert time.monotonic() - start >= 0.25
        rs.reset_counters()
        for _ in range(3):
            c.db.x.find_one({})
        assert rs.command_count("find") == 3
        rs.step_down(0.5)
        with pytest.raises(pymongo.errors.PyMongoError):
            c.db.x.insert_one({"_id": 2})
        # pymongo waits for a primary again and the write then succeeds.
        c.db.x.insert_one({"_id": 3})
        assert c.db.x.count_documents({}) == 2
        c.close()


def test_resumable_error_label_makes_pymongo_resume() -> None:
    listener = Listener()
    with FakeReplicaSet() as rs:
        c = _client(rs.uri, event_listeners=[listener])
        coll = c.db.orders
        coll.insert_one({"_id": 0})
        with coll.watch(max_await_time_ms=100) as stream:
            coll.insert_one({"_id": 1})
            _drain(stream, 1)
            rs.fail("getMore", code=91, labels=["ResumableChangeStreamError"])
            coll.insert_one({"_id": 2})
            (second,) = _drain(stream, 1)
        assert second["documentKey"] == {"_id": 2}
        assert len(listener.of("aggregate")) == 2
        c.close()


def test_data_dir_survives_a_restart(tmp_path: Any) -> None:
    rs = FakeReplicaSet(data_dir=str(tmp_path)).start()
    c = _client(rs.uri)
    c.db.orders.insert_one({"_id": 1, "n": 1})
    c.db.orders.create_index("n", name="n_1")
    with c.db.orders.watch(max_await_time_ms=100) as stream:
        c.db.orders.update_one({"_id": 1}, {"$set": {"n": 2}})
        (event,) = _drain(stream, 1)
    c.db.orders.insert_one({"_id": 2})
    c.close()
    port = rs.port
    rs.stop()
    rs2 = FakeReplicaSet(port, data_dir=str(tmp_path)).start()
    c = _client(rs2.uri)
    assert c.db.orders.find_one({"_id": 1}) == {"_id": 1, "n": 2}
    assert "n_1" in c.db.orders.index_information()
    with c.db.orders.watch(resume_after=event["_id"], max_await_time_ms=100) as stream:
        (after,) = _drain(stream, 1)
    assert after["documentKey"] == {"_id": 2}
    c.close()
    rs2.stop()


def test_standalone_mode_refuses_change_streams() -> None:
    with FakeReplicaSet(standalone=True) as rs:
        c = _client(rs.uri)
        c.db.x.insert_one({"_id": 1})
        with pytest.raises(OperationFailure) as info:
            c.db.x.watch()
        assert info.value.code == 40573
        c.close()


def test_runs_as_a_process(tmp_path: Any) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mongo_events.testing.server", "--port", "0", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri.startswith("mongodb://127.0.0.1:") and "replicaSet=rs0" in uri
        c = _client(uri)
        c.db.x.insert_one({"_id": ObjectId()})
        assert c.db.x.count_documents({}) == 1
        reply = c.admin.command({"mongoEventsFake": 1, "fail": {"command": "find", "code": 2, "times": 1}})
        assert reply["counters"]["insert"] == 1
        with pytest.raises(OperationFailure):
            c.db.x.find_one()
        c.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_fake_unique_indexes_hold_after_deletes_updates_and_rollbacks(server_uri: str, db_name: str) -> None:
    """The fake checks unique indexes by hash, not by scanning: same answers as a scan."""
    client = _client(server_uri)
    coll = client[db_name]["uniq"]
    coll.create_index([("a", 1), ("b", 1)], unique=True)
    coll.insert_many([{"_id": i, "a": i % 10, "b": i // 10} for i in range(100)])
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        coll.insert_one({"_id": "dup", "a": 3, "b": 4})
    assert coll.find_one({"_id": "dup"}) is None  # rolled back
    coll.delete_one({"_id": 43})
    coll.insert_one({"_id": "again", "a": 3, "b": 4})  # the deleted key is free again
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        coll.update_one({"_id": 0}, {"$set": {"a": 1, "b": 0}})  # collides with _id 1
    assert coll.find_one({"_id": 0}) == {"_id": 0, "a": 0, "b": 0}  # rolled back
    coll.update_one({"_id": 0}, {"$set": {"b": 99}})
    coll.insert_one({"_id": "reuse", "a": 0, "b": 0})  # 0's old key was released by the update
    with pytest.raises(pymongo.errors.DuplicateKeyError):
        coll.insert_one({"_id": "x", "a": 0, "b": 99})
    coll.insert_one({"_id": "m1"})
    with pytest.raises(pymongo.errors.DuplicateKeyError):  # missing fields index as null, as on a server
        coll.insert_one({"_id": "m2"})
    client.close()
