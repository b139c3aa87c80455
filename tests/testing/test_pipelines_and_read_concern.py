"""Stages after ``$changeStream``, resume-token errors and read concerns, with MongoDB's semantics.

Tests taking ``server_uri`` also run against a real replica set (they skip here).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pymongo.errors import OperationFailure
from pymongo.read_concern import ReadConcern

from mongo_events.testing import FakeReplicaSet

from .support import client, drain


@pytest.fixture
def coll(server_uri: str) -> Any:
    c = client(server_uri)
    coll = c[f"t_{uuid.uuid4().hex[:8]}"]["orders"]
    coll.insert_one({"_id": 0})
    yield coll
    c.close()


def _one(coll: Any, pipeline: list[dict[str, Any]]) -> dict[str, Any]:
    with coll.watch(pipeline, max_await_time_ms=100) as stream:
        coll.insert_one({"_id": 1, "a": 1})
        (event,) = drain(stream, 1)
    coll.delete_one({"_id": 1})
    return event


def test_dotted_keys_in_add_fields_and_project_nest(coll: Any) -> None:
    added = _one(coll, [{"$addFields": {"ns.viewOn": "v"}}])
    assert added["ns"] == {"db": coll.database.name, "coll": "orders", "viewOn": "v"}
    projected = _one(coll, [{"$project": {"operationType": 1, "ns.viewOn": {"$concat": ["$ns.db", ".v"]}}}])
    assert projected["ns"] == {"viewOn": f"{coll.database.name}.v"}
    assert set(projected) == {"_id", "operationType", "ns"}


def test_unset_and_nested_projection(coll: Any) -> None:
    unset = _one(coll, [{"$unset": ["fullDocument.a", "wallTime"]}])
    assert unset["fullDocument"] == {"_id": 1} and "wallTime" not in unset
    nested = _one(coll, [{"$project": {"ns": {"coll": 1}}}])
    assert nested["ns"] == {"coll": "orders"}


def test_the_pipeline_does_not_change_the_stored_event(coll: Any) -> None:
    """A stage that rewrites fullDocument must not leak into another stream's copy of the event."""
    with (
        coll.watch([{"$set": {"fullDocument.a": "changed"}}], max_await_time_ms=100) as changed,
        coll.watch(max_await_time_ms=100) as plain,
    ):
        coll.insert_one({"_id": 1, "a": 1})
        (first,) = drain(changed, 1)
        (second,) = drain(plain, 1)
    assert first["fullDocument"]["a"] == "changed" and second["fullDocument"]["a"] == 1


def test_projecting_out_the_resume_token_is_fatal_and_labelled(coll: Any) -> None:
    with coll.watch([{"$project": {"_id": 0}}], max_await_time_ms=100) as stream:
        coll.insert_one({"_id": 1})
        with pytest.raises(OperationFailure) as info:
            drain(stream, 1)
    assert info.value.code == 280
    assert info.value.has_error_label("NonResumableChangeStreamError")
    assert not stream.alive


@pytest.mark.parametrize("level", ["local", "available"])
def test_read_concerns_other_than_majority_are_refused(coll: Any, level: str) -> None:
    with pytest.raises(OperationFailure) as info:
        coll.with_options(read_concern=ReadConcern(level)).watch()
    assert info.value.code == 72  # InvalidOptions


@pytest.mark.parametrize("level", ["linearizable", "snapshot"])
def test_the_fake_refuses_the_other_levels_alike(fake_rs: FakeReplicaSet, level: str) -> None:
    # Fake-only: a real server may refuse these earlier, with another code.
    c = client(fake_rs.uri)
    with pytest.raises(OperationFailure) as info:
        c.db.orders.with_options(read_concern=ReadConcern(level)).watch()
    assert info.value.code == 72
    c.close()


def test_a_numeric_projection_value_includes_the_field(coll: Any) -> None:
    event = _one(coll, [{"$project": {"operationType": 5, "ns": True}}])
    assert set(event) == {"_id", "operationType", "ns"} and event["operationType"] == "insert"


def test_majority_read_concern_is_accepted(coll: Any) -> None:
    event = _one(coll.with_options(read_concern=ReadConcern("majority")), [])
    assert event["documentKey"] == {"_id": 1}


def test_a_change_stream_inside_a_transaction_is_refused(coll: Any) -> None:
    with coll.database.client.start_session() as session, session.start_transaction():
        with pytest.raises(OperationFailure) as info:
            coll.watch(session=session)
    assert info.value.code == 263  # OperationNotSupportedInTransaction


def test_an_invalid_resume_token_is_260_and_not_resumable(fake_rs: FakeReplicaSet) -> None:
    c = client(fake_rs.uri)
    with pytest.raises(OperationFailure) as info:
        c.db.orders.watch(resume_after={"_data": "not-a-token"})
    assert info.value.code == 260
    assert not info.value.has_error_label("ResumableChangeStreamError")
    c.close()
