"""The 16 MiB limit on change events, and ``$changeStreamSplitLargeEvent``, as on MongoDB 7.0+.

Both tests also run against a real replica set (they skip here).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pymongo.errors import OperationFailure

from mongo_events.testing import FakeReplicaSet

from .support import client, drain

_NINE_MIB = "x" * (9 * 1024 * 1024)


def _large_update(server_uri: str, pipeline: list[dict[str, Any]]) -> Any:
    """An update whose event carries a 9 MiB pre-image and a 9 MiB post-image: over 16 MiB in all."""
    c = client(server_uri)
    db = c[f"t_{uuid.uuid4().hex[:8]}"]
    db.create_collection("big", changeStreamPreAndPostImages={"enabled": True})
    db.big.insert_one({"_id": 1, "blob": _NINE_MIB, "n": 0})
    stream = db.big.watch(
        pipeline, full_document="required", full_document_before_change="required", max_await_time_ms=100
    )
    db.big.update_one({"_id": 1}, {"$set": {"n": 1}})
    return c, stream


def test_an_event_over_16_mib_fails_with_10334(server_uri: str) -> None:
    c, stream = _large_update(server_uri, [])
    with pytest.raises(OperationFailure) as info:
        drain(stream, 1)
    assert info.value.code == 10334  # BSONObjectTooLarge
    stream.close()
    c.close()


def test_split_large_event_delivers_fragments_that_reassemble(server_uri: str) -> None:
    c, stream = _large_update(server_uri, [{"$changeStreamSplitLargeEvent": {}}])
    first = drain(stream, 1)
    assert first and "splitEvent" in first[0]
    total = first[0]["splitEvent"]["of"]
    fragments = first + drain(stream, total - 1)
    assert total >= 2 and [f["splitEvent"] for f in fragments] == [
        {"fragment": i, "of": total} for i in range(1, total + 1)
    ]
    event: dict[str, Any] = {}
    for fragment in fragments:
        event.update({k: v for k, v in fragment.items() if k not in ("_id", "splitEvent")})
    assert event["operationType"] == "update"
    assert event["fullDocument"]["n"] == 1 and event["fullDocumentBeforeChange"]["n"] == 0
    assert len(event["fullDocument"]["blob"]) == len(_NINE_MIB)
    stream.close()
    c.close()


def test_the_limit_is_a_parameter_of_the_fake() -> None:
    with FakeReplicaSet(max_event_size=None) as rs:
        c, stream = _large_update(rs.uri, [])
        (event,) = drain(stream, 1)  # no limit: the whole event arrives
        assert event["fullDocumentBeforeChange"]["n"] == 0
        stream.close()
        c.close()
