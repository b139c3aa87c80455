"""Expanded (DDL) events, collection UUIDs and pre-/post-images, as MongoDB 6.0+ emits them.

Tests taking ``server_uri`` also run against a real replica set (they skip here).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from bson import Binary
from pymongo.errors import OperationFailure

from mongo_events.testing import FakeReplicaSet

from .support import client, drain


@pytest.fixture
def db_name() -> str:
    return f"t_{uuid.uuid4().hex[:8]}"


def _uuid_of(c: Any, db: str, coll: str) -> Any:
    (info,) = c[db].list_collections(filter={"name": coll})
    return info["info"]["uuid"]


def test_ddl_events_with_operation_description_and_collection_uuid(server_uri: str, db_name: str) -> None:
    c = client(server_uri)
    db = c[db_name]
    with db.watch(show_expanded_events=True, max_await_time_ms=100) as stream:
        db.create_collection("orders")
        db.orders.create_index("sku", name="sku_1")
        db.orders.insert_one({"_id": 1})
        db.command({"collMod": "orders", "changeStreamPreAndPostImages": {"enabled": True}})
        db.orders.drop_index("sku_1")
        db.orders.drop()
        events = drain(stream, 6)
    assert [e["operationType"] for e in events] == [
        "create",
        "createIndexes",
        "insert",
        "modify",
        "dropIndexes",
        "drop",
    ]
    create, created_ix, insert, modify, dropped_ix, drop = events
    uuids = {e["collectionUUID"] for e in events}
    assert len(uuids) == 1
    (coll_uuid,) = uuids
    assert isinstance(coll_uuid, Binary) and coll_uuid.subtype == 4
    assert create["operationDescription"]["idIndex"] == {"v": 2, "key": {"_id": 1}, "name": "_id_"}
    (ix,) = created_ix["operationDescription"]["indexes"]
    assert ix["name"] == "sku_1" and ix["key"] == {"sku": 1}
    assert "operationDescription" not in insert and insert["fullDocument"] == {"_id": 1}
    assert modify["operationDescription"] == {"changeStreamPreAndPostImages": {"enabled": True}}
    assert modify["stateBeforeChange"]["collectionOptions"]["uuid"] == coll_uuid
    assert [i["name"] for i in dropped_ix["operationDescription"]["indexes"]] == ["sku_1"]
    assert drop["ns"] == {"db": db_name, "coll": "orders"}
    c.close()


def test_a_consumer_waiting_for_a_ddl_event_receives_it(server_uri: str, db_name: str) -> None:
    """Collection-level stream on a collection that does not exist yet: its implicit creation is an event."""
    c = client(server_uri)
    coll = c[db_name]["later"]
    with coll.watch(show_expanded_events=True, max_await_time_ms=100) as stream:
        coll.insert_one({"_id": 1})
        first, second = drain(stream, 2)
    assert (first["operationType"], second["operationType"]) == ("create", "insert")
    assert first["collectionUUID"] == second["collectionUUID"] == _uuid_of(c, db_name, "later")
    c.close()


def test_without_expanded_events_ddl_is_invisible(server_uri: str, db_name: str) -> None:
    c = client(server_uri)
    db = c[db_name]
    with db.watch(max_await_time_ms=100) as stream:
        db.create_collection("a")
        db.a.create_index("x")
        db.a.insert_one({"_id": 1})
        (insert,) = drain(stream, 1)
        assert stream.try_next() is None
    assert insert["operationType"] == "insert" and "collectionUUID" not in insert
    c.close()


def test_rename_with_expanded_events_describes_the_target(server_uri: str, db_name: str) -> None:
    c = client(server_uri)
    db = c[db_name]
    db.a.insert_one({"_id": 1})
    with db.watch(show_expanded_events=True, max_await_time_ms=100) as stream:
        db.a.rename("b")
        (rename,) = drain(stream, 1)
    assert rename["operationType"] == "rename"
    assert rename["operationDescription"]["to"] == {"db": db_name, "coll": "b"}
    assert rename["collectionUUID"] == _uuid_of(c, db_name, "b")
    c.close()


# -- pre- and post-images -----------------------------------------------------------


def _write_all(coll: Any) -> None:
    coll.update_one({"_id": 1}, {"$set": {"n": 2}})
    coll.replace_one({"_id": 1}, {"n": 3})
    coll.delete_one({"_id": 1})


def test_images_when_the_collection_records_them(server_uri: str, db_name: str) -> None:
    c = client(server_uri)
    db = c[db_name]
    db.create_collection("imaged", changeStreamPreAndPostImages={"enabled": True})
    (info,) = db.list_collections(filter={"name": "imaged"})
    assert info["options"]["changeStreamPreAndPostImages"] == {"enabled": True}
    db.imaged.insert_one({"_id": 1, "n": 1})
    with db.imaged.watch(
        full_document="required", full_document_before_change="required", max_await_time_ms=100
    ) as stream:
        _write_all(db.imaged)
        update, replace, delete = drain(stream, 3)
    assert update["fullDocument"] == {"_id": 1, "n": 2} and update["fullDocumentBeforeChange"] == {
        "_id": 1,
        "n": 1,
    }
    assert replace["fullDocumentBeforeChange"] == {"_id": 1, "n": 2}
    assert delete["fullDocumentBeforeChange"] == {"_id": 1, "n": 3}
    c.close()


@pytest.mark.parametrize("option", ["full_document", "full_document_before_change"])
def test_required_images_fail_where_the_collection_records_none(
    server_uri: str, db_name: str, option: str
) -> None:
    c = client(server_uri)
    coll = c[db_name]["plain"]
    coll.insert_one({"_id": 1, "n": 1})
    with coll.watch(**{option: "required"}, max_await_time_ms=100) as stream:
        coll.update_one({"_id": 1}, {"$set": {"n": 2}})
        with pytest.raises(OperationFailure) as info:
            drain(stream, 1)
    assert info.value.code == 47  # NoMatchingDocument
    assert "was not found for event" in str(info.value)
    c.close()


def test_when_available_images_are_null_where_the_collection_records_none(
    server_uri: str, db_name: str
) -> None:
    c = client(server_uri)
    coll = c[db_name]["plain"]
    coll.insert_one({"_id": 1, "n": 1})
    with coll.watch(
        full_document="whenAvailable", full_document_before_change="whenAvailable", max_await_time_ms=100
    ) as stream:
        _write_all(coll)
        update, replace, delete = drain(stream, 3)
    assert update["fullDocument"] is None and update["fullDocumentBeforeChange"] is None
    assert replace["fullDocument"] == {"_id": 1, "n": 3}  # a replace carries its document regardless
    assert replace["fullDocumentBeforeChange"] is None and delete["fullDocumentBeforeChange"] is None
    c.close()


def test_images_start_with_coll_mod(server_uri: str, db_name: str) -> None:
    c = client(server_uri)
    coll = c[db_name]["later_imaged"]
    coll.insert_one({"_id": 1, "n": 1})
    with coll.watch(full_document_before_change="whenAvailable", max_await_time_ms=100) as stream:
        coll.update_one({"_id": 1}, {"$set": {"n": 2}})
        c[db_name].command({"collMod": "later_imaged", "changeStreamPreAndPostImages": {"enabled": True}})
        coll.update_one({"_id": 1}, {"$set": {"n": 3}})
        before, after = drain(stream, 2)
    assert before["fullDocumentBeforeChange"] is None  # written before images were on
    assert after["fullDocumentBeforeChange"] == {"_id": 1, "n": 2}
    c.close()


def test_catalog_and_images_survive_a_restart(tmp_path: Any) -> None:
    with FakeReplicaSet(data_dir=str(tmp_path)) as rs:
        c = client(rs.uri)
        c.db.create_collection("kept", changeStreamPreAndPostImages={"enabled": True})
        c.db.kept.create_index("x", name="x_1")
        c.db.kept.insert_one({"_id": 1, "x": 1})
        before = _uuid_of(c, "db", "kept")
        c.close()
        port = rs.port
    with FakeReplicaSet(port, data_dir=str(tmp_path)) as rs:
        c = client(rs.uri)
        assert _uuid_of(c, "db", "kept") == before
        assert "x_1" in c.db.kept.index_information()
        with c.db.kept.watch(full_document_before_change="required", max_await_time_ms=100) as stream:
            c.db.kept.update_one({"_id": 1}, {"$set": {"x": 2}})
            (event,) = drain(stream, 1)
        assert event["fullDocumentBeforeChange"] == {"_id": 1, "x": 1}
        c.close()


def test_a_bus_subscriber_receives_ddl_events(server_client: Any, make_bus: Any) -> None:
    """The consumer that waits for a DDL event (a barrier, a schema change) gets it rather than hanging."""
    from ..helpers import Recorder

    coll = server_client.shop.orders
    coll.insert_one({"_id": 0})
    seen = Recorder()
    bus = make_bus(coll, show_expanded_events=True)
    bus.subscribe(lambda ev: seen.add(str(ev.operation_type)))
    bus.start()
    coll.create_index("sku", name="sku_1")
    coll.insert_one({"_id": 1})
    coll.drop_index("sku_1")
    assert seen.wait(3) == ["createIndexes", "insert", "dropIndexes"]
