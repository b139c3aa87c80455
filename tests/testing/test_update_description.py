"""``updateDescription`` as the server computes it: exact paths, array indexes, disambiguated paths.

Every test also runs against a real replica set (MongoDB 6.1+ for ``disambiguatedPaths``; it skips here).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from .support import client, drain


@pytest.fixture
def coll(server_uri: str) -> Any:
    c = client(server_uri)
    yield c[f"t_{uuid.uuid4().hex[:8]}"]["docs"]
    c.close()


def _update(coll: Any, doc: dict[str, Any], update: Any, expanded: bool = True) -> dict[str, Any]:
    coll.insert_one(doc)
    with coll.watch(show_expanded_events=expanded, max_await_time_ms=100) as stream:
        coll.update_one({"_id": doc["_id"]}, update)
        (event,) = drain(stream, 1)
    assert event["operationType"] == "update"
    desc: dict[str, Any] = event["updateDescription"]
    return desc


def test_a_path_through_an_array_to_a_numeric_field_is_exact(coll: Any) -> None:
    desc = _update(coll, {"_id": 1, "a": [{"1": 1, "pad": "x" * 64}]}, {"$set": {"a.0.1": 2}})
    assert desc["updatedFields"] == {"a.0.1": 2}
    assert desc["disambiguatedPaths"] == {"a.0.1": ["a", 0, "1"]}


def test_array_indexes_alone_are_not_ambiguous(coll: Any) -> None:
    desc = _update(
        coll,
        {"_id": 1, "arr": [{"b": 1}, {"b": 2, "pad": "x" * 64}], "r": [0, 1, 2, 3]},
        {"$set": {"arr.1.b": 5, "r": [0]}},
    )
    assert desc["updatedFields"] == {"arr.1.b": 5, "r": [0]}
    assert desc["truncatedArrays"] == [] and desc["disambiguatedPaths"] == {}


def test_numeric_field_names_in_documents_are_ambiguous(coll: Any) -> None:
    desc = _update(
        coll, {"_id": 1, "o": {"0": {"1": "numeric", "pad": "x" * 64}}}, {"$set": {"o.0.1": "updated"}}
    )
    assert desc["updatedFields"] == {"o.0.1": "updated"}
    assert desc["disambiguatedPaths"] == {"o.0.1": ["o", "0", "1"]}


def test_unset_and_inc_report_their_paths(coll: Any) -> None:
    desc = _update(coll, {"_id": 1, "a": {"b": 1, "c": 2}, "n": 1}, {"$unset": {"a.c": ""}, "$inc": {"n": 1}})
    assert desc["updatedFields"] == {"n": 2}
    assert desc["removedFields"] == ["a.c"]


def test_a_plain_push_reports_the_appended_elements(coll: Any) -> None:
    desc = _update(coll, {"_id": 1, "tags": ["a", "b"]}, {"$push": {"tags": "c"}})
    assert desc["updatedFields"] == {"tags.2": "c"}


def test_without_expanded_events_there_is_no_disambiguated_paths(coll: Any) -> None:
    desc = _update(coll, {"_id": 1, "a": [{"1": 1, "pad": "x" * 64}]}, {"$set": {"a.0.1": 2}}, expanded=False)
    assert desc["updatedFields"] == {"a.0.1": 2}
    version = tuple(coll.database.client.server_info()["versionArray"][:2])
    # MongoDB 8.2 reports it on every update event; before, only with expanded events (the fake is 7.0).
    assert ("disambiguatedPaths" in desc) == (version >= (8, 2))


def test_a_pipeline_update_reports_truncated_arrays(coll: Any) -> None:
    pad = "x" * 128
    desc = _update(
        coll, {"_id": 1, "arr": [pad, 1, 2], "keep": 1}, [{"$set": {"arr": {"$slice": ["$arr", 1]}}}]
    )
    assert desc["truncatedArrays"] == [{"field": "arr", "newSize": 1}]
    assert desc["updatedFields"] == {} and desc["removedFields"] == []
