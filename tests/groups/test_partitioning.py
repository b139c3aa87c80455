"""The partition hash is MongoDB's hashed-index hash, stable across processes and Python versions."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import uuid
from typing import Any

import pymongo
import pytest
from bson import Int64, ObjectId
from bson.binary import Binary
from bson.regex import Regex
from bson.timestamp import Timestamp
from pymongo.errors import OperationFailure

from mongo_events.groups import (
    event_partition,
    hashed_index_key,
    partition_of,
    server_match_stage,
    server_supports_hashed_keys,
)

# (value, MongoDB's hash): the manual's $toHashedIndexKey example, then the server's own
# hasher unit-test vectors (src/mongo/db/hasher_test.cpp), "determined experimentally" there.
VECTORS: list[tuple[Any, int]] = [
    ("string to hash", 763543691661428748),
    (42, -944302157085130861),
    (42.123, -944302157085130861),
    (Int64(42), -944302157085130861),
    (0, 4854801880128277513),
    (0.456, 4854801880128277513),
    (float("nan"), 4854801880128277513),
    (1, 5902408780260971510),
    (1.987, 5902408780260971510),
    (-1, 1140205862565771219),
    (-1.789, 1140205862565771219),
    (-(2**31), 6165898260261354870),
    (2**31 - 1, 1143184177162245883),
    (sys.float_info.max, 921523596458303250),
    (2**63 - 1, 921523596458303250),
    (-sys.float_info.max, 4532067210535695462),
    (-(2**63), 4532067210535695462),
    (None, 2338878944348059895),
    ("abc", 8478485326885698097),
    ("", 2049396243249673340),
    ({"a": "abc", "b": Int64(123)}, 4771603801758380216),
    ({}, 7980500913326740417),
    (["bar", "baz", "qux"], -2938911267422831539),
    ([], 8849948234993459283),
    (Binary(bytes([0, 1, 2, 3, 4, 6]), 0), 7252465090394235301),
    (Binary(bytes([0, 1, 2, 3, 4, 6]), 128), 5736670452907618262),
    (uuid.UUID(bytes=bytes(range(16))), 6084661258071355978),
    (ObjectId("010203040506070809101112"), -5588663249627035708),
    (ObjectId("000000000000000000000000"), -4293118519463489418),
    (True, 6405873908747105701),
    (False, 6289544573401934092),
    (datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc), -1178696894582842035),
    (Regex("mongodb"), -7275792090268217043),
    (Regex(".*", "i"), 7095855029187981886),
]


@pytest.mark.parametrize(("value", "expected"), [v for v in VECTORS if v[1] is not None], ids=repr)
def test_the_hash_is_mongodbs_hashed_index_hash(value: Any, expected: int) -> None:
    assert hashed_index_key(value) == expected


def test_recursive_squashing_of_ints_and_doubles_as_the_server_does() -> None:
    assert hashed_index_key({"a": 3, "b": [3.1, {"c": 3}]}) == hashed_index_key(
        {"a": 3.1, "b": [3, {"c": 3.0}]}
    )


def test_types_the_client_cannot_hash_are_refused_not_guessed() -> None:
    with pytest.raises(TypeError, match="Timestamp"):
        hashed_index_key(Timestamp(1, 2))


# A fixed table of document ids -> partitions (K = 6): changing the hash moves every document.
TABLE = [
    ("order-1", 1),
    ("string to hash", 0),
    (0, 1),
    (1, 2),
    (-1, 3),
    (42, 1),
    (ObjectId("5f5b5c5d5e5f606162636465"), 2),
    (uuid.UUID("12345678-1234-5678-1234-567812345678"), 3),
    ({"a": 1, "b": "x"}, 1),
    (None, 5),
]


@pytest.mark.parametrize(("key", "partition"), TABLE, ids=repr)
def test_partition_table(key: Any, partition: int) -> None:
    assert partition_of(key, 6) == partition


def test_the_hash_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = "from mongo_events.groups import partition_of; print([partition_of(k, 6) for k in ('order-1', 'string to hash', 0, 1, -1, 42)])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == str([p for _, p in TABLE[:6]])


def test_one_partition_is_everything_and_partitions_must_be_positive() -> None:
    assert {partition_of(k, 1) for k, _ in TABLE} == {0}
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="partitions"):
            partition_of(1, bad)  # type: ignore[arg-type]


def test_partitions_are_spread_roughly_evenly() -> None:
    counts = [0] * 8
    for i in range(8000):
        counts[partition_of(ObjectId(f"{i:024x}"), 8)] += 1
    assert min(counts) > 800, counts  # 1000 expected each


def test_events_without_a_document_key_belong_to_partition_0() -> None:
    assert event_partition({"operationType": "drop", "ns": {"db": "d", "coll": "c"}}, 8) == 0
    assert event_partition({"operationType": "invalidate"}, 8) == 0
    assert event_partition({"operationType": "insert", "documentKey": {"_id": 42}}, 8) == partition_of(42, 8)


def test_the_server_stage_splits_a_change_stream_like_the_client(client: pymongo.MongoClient[Any]) -> None:
    """The fake evaluates ``$toHashedIndexKey`` and the server's ``$mod``: K streams see every change once."""
    coll = client.shop.orders
    keys: list[Any] = (
        [f"order-{i}" for i in range(30)] + list(range(-10, 10)) + [ObjectId() for _ in range(10)]
    )
    k = 4
    streams = [coll.watch([server_match_stage(p, k)]) for p in range(k)]
    for key in keys:
        coll.insert_one({"_id": key})
    coll.drop()
    seen: dict[int, list[Any]] = {p: [] for p in range(k)}
    for p, stream in enumerate(streams):
        while True:
            change = stream.try_next()
            if change is None:
                break
            seen[p].append(change)
            if change["operationType"] == "invalidate":
                break
        stream.close()
    for p in range(k):
        ids = [c["documentKey"]["_id"] for c in seen[p] if "documentKey" in c]
        assert ids == [key for key in keys if partition_of(key, k) == p]
        data = [c for c in seen[p] if c["operationType"] != "invalidate"]
        assert all(event_partition(c, k) == p for c in data)
        # The server never filters an invalidate out: every partition's stream sees it (and continues past it).
        assert seen[p][-1]["operationType"] == "invalidate"
    assert [c["operationType"] for c in seen[0] if "documentKey" not in c] == ["drop", "invalidate"]
    assert all("documentKey" in c for p in range(1, k) for c in seen[p][:-1])


def test_the_probe_finds_server_side_hashing_on_the_fake(client: pymongo.MongoClient[Any]) -> None:
    client.shop["_event_leases"].insert_one({"_id": "x"})
    assert server_supports_hashed_keys(client.shop["_event_leases"]) is True


class _OldServer:
    def __init__(self, code: int) -> None:
        self.code = code

    def aggregate(self, pipeline: Any) -> Any:
        raise OperationFailure(
            "Invalid $project :: caused by :: Unrecognized expression '$toHashedIndexKey'", self.code
        )


def test_the_probe_reports_an_old_server_and_raises_other_failures() -> None:
    assert server_supports_hashed_keys(_OldServer(168)) is False
    assert server_supports_hashed_keys(_OldServer(31325)) is False
    with pytest.raises(OperationFailure, match="not primary"):
        server_supports_hashed_keys(_Down())


class _Down:
    def aggregate(self, pipeline: Any) -> Any:
        raise OperationFailure("not primary", 10107)
