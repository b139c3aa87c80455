"""Partitions: a stable hash of a change's document key, on the server or on the client.

The hash is MongoDB's hashed-index hash (``BSONElementHasher::hash64`` with seed 0: the
first 8 bytes, little-endian, of an MD5 over the seed, the value's canonical type and its
bytes, numbers squashed to a 64-bit integer), so :func:`partition_of` on the client and the
:func:`server_match_stage` evaluated by a server with ``$toHashedIndexKey`` put every
document in the same partition. The hash depends on no process state (no ``PYTHONHASHSEED``)
and no Python version. It is checked against MongoDB's documented example (``"string to
hash"`` -> ``763543691661428748``) and the server's own hasher test vectors, in
``tests/groups/test_partitioning.py``.

A document belongs to ``hash(documentKey._id) mod K`` (``K`` partitions, the remainder taken
with the sign of the hash like the server's ``$mod``, then made positive). Events without a
document key (drop, rename, invalidate, DDL) belong to partition 0 only.

.. versionadded:: 0.2.0
"""

from __future__ import annotations

import datetime
import hashlib
import math
import re
import struct
import uuid
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

import bson
from bson import ObjectId
from bson.binary import Binary
from bson.int64 import Int64
from bson.regex import Regex

__all__ = [
    "PartitionMode",
    "hashed_index_key",
    "partition_of",
    "server_match_stage",
    "event_partition",
    "server_supports_hashed_keys",
]


class PartitionMode(str, Enum):
    """Where a group's members split the change stream into partitions.

    ``SERVER``: each partition's stream carries a ``$match`` on ``$toHashedIndexKey`` (the
    server drops the other partitions' changes). ``CLIENT``: every member reads every change
    and keeps its partitions' with :func:`event_partition`. Both compute the same hash; a group
    records its mode and refuses a member with the other one.
    """

    SERVER = "server"
    CLIENT = "client"


# MongoDB's canonical type order (BSONElement::canonicalType).
_NULL, _NUMBER, _STRING, _OBJECT, _ARRAY, _BINARY, _OBJECTID, _BOOL, _DATE, _REGEX = (
    5,
    10,
    15,
    20,
    25,
    30,
    35,
    40,
    45,
    50,
)
_END_OF_OBJECT = struct.pack("<i", 0)  # its canonical type; it has no name and no value
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def hashed_index_key(value: Any) -> int:
    """MongoDB's hashed-index key of ``value`` (what ``$toHashedIndexKey`` returns), a signed 64-bit int.

    Supported: ``None``, ``bool``, ``int``, ``float``, ``str``, ``ObjectId``, ``datetime``,
    ``Binary``/``bytes``, ``uuid.UUID`` (as standard binary subtype 4), ``Regex``,
    mappings and sequences of these.

    :raises TypeError: for another type (``Decimal128``, ``Timestamp``, code, min/max keys): such keys cannot be
        split on the client; use one partition or the server mode.
    """
    digest = hashlib.md5(struct.pack("<i", 0), usedforsecurity=False)
    _hash_element(digest, value, None)
    return int(struct.unpack("<q", digest.digest()[:8])[0])


def _hash_element(digest: Any, value: Any, name: str | None) -> None:
    canonical, payload, children = _canonical(value)
    digest.update(struct.pack("<i", canonical))
    if name is not None:
        digest.update(name.encode("utf-8") + b"\x00")
    if children is None:
        digest.update(payload)
        return
    for child_name, child in children:
        _hash_element(digest, child, child_name)
    digest.update(_END_OF_OBJECT)  # the server iterates up to and including the end-of-object element


def _canonical(value: Any) -> tuple[int, bytes, list[tuple[str, Any]] | None]:
    if value is None:
        return _NULL, b"", None
    if isinstance(value, bool):
        return _BOOL, b"\x01" if value else b"\x00", None
    if isinstance(value, (int, Int64)):
        return _NUMBER, struct.pack("<q", max(_INT64_MIN, min(_INT64_MAX, int(value)))), None
    if isinstance(value, float):
        return _NUMBER, struct.pack("<q", _safe_long(value)), None
    if isinstance(value, str):
        data = value.encode("utf-8")
        return _STRING, struct.pack("<i", len(data) + 1) + data + b"\x00", None
    if isinstance(value, ObjectId):
        return _OBJECTID, value.binary, None
    if isinstance(value, datetime.datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=datetime.timezone.utc)
        millis = (moment - _EPOCH) // datetime.timedelta(milliseconds=1)
        return _DATE, struct.pack("<q", millis), None
    if isinstance(value, uuid.UUID):
        return _BINARY, struct.pack("<i", 16) + b"\x04" + value.bytes, None
    if isinstance(value, Binary):
        return _BINARY, struct.pack("<i", len(value)) + bytes([value.subtype]) + bytes(value), None
    if isinstance(value, (bytes, bytearray)):
        return _BINARY, struct.pack("<i", len(value)) + b"\x00" + bytes(value), None
    if isinstance(value, (Regex, re.Pattern)):
        encoded = bson.encode({"r": value})  # int32 size, type, "r\0", the value's bytes, "\0"
        return _REGEX, encoded[7:-1], None
    if isinstance(value, Mapping):
        return _OBJECT, b"", [(str(k), v) for k, v in value.items()]
    if isinstance(value, Sequence):
        return _ARRAY, b"", [(str(i), v) for i, v in enumerate(value)]
    raise TypeError(f"cannot compute MongoDB's hashed-index key of a {type(value).__name__} on the client")


def _safe_long(value: float) -> int:
    """``BSONElement::safeNumberLong`` of a double: NaN is 0, out of range saturates, else truncates."""
    if math.isnan(value):
        return 0
    if value >= 2.0**63:
        return _INT64_MAX
    if value < -(2.0**63):
        return _INT64_MIN
    return int(value)


def partition_of(key_id: Any, partitions: int) -> int:
    """The partition (``0 .. partitions - 1``) of a document whose ``_id`` is ``key_id``.

    :raises ValueError: when ``partitions`` is not a positive int.
    """
    _check_partitions(partitions)
    if partitions == 1:
        return 0
    # |hash rem K| with the remainder's sign following the hash (the server's $mod, then $abs).
    return abs(hashed_index_key(key_id)) % partitions


def event_partition(event: Mapping[str, Any], partitions: int) -> int:
    """The partition of a raw change event: by ``documentKey._id``, or 0 without a document key."""
    _check_partitions(partitions)
    key = event.get("documentKey")
    if not isinstance(key, Mapping) or "_id" not in key:
        return 0
    return partition_of(key["_id"], partitions)


def server_match_stage(partition: int, partitions: int) -> dict[str, Any]:
    """The ``$match`` stage that keeps partition ``partition``'s changes of a change stream.

    Put it right after ``$changeStream`` (before any user stage that could reshape
    ``documentKey``). Partition 0 also keeps events without a document key.
    """
    _check_partitions(partitions)
    if not 0 <= partition < partitions:
        raise ValueError(f"partition must be in 0..{partitions - 1}, not {partition!r}")
    in_partition = {
        "$expr": {
            "$eq": [{"$abs": {"$mod": [{"$toHashedIndexKey": "$documentKey._id"}, partitions]}}, partition]
        }
    }
    has_key = {"documentKey._id": {"$exists": True}}
    if partition == 0:
        return {"$match": {"$or": [{"documentKey._id": {"$exists": False}}, in_partition]}}
    return {"$match": {"$and": [has_key, in_partition]}}


def _check_partitions(partitions: int) -> None:
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions must be a positive int, not {partitions!r}")


def server_supports_hashed_keys(collection: Any) -> bool:
    """Whether the server evaluates ``$toHashedIndexKey`` (then use :attr:`PartitionMode.SERVER`).

    A probe rather than a version check: the operator was added for resharding
    (SERVER-49214) before the manual documented it. It runs one aggregation that parses
    the expression on ``collection`` (the lease collection will do) and reads nothing.

    :raises pymongo.errors.PyMongoError: when the server fails for another reason than an
        unknown expression (code 168 ``InvalidPipelineOperator``, or 31325).
    """
    from pymongo.errors import OperationFailure

    try:
        list(collection.aggregate([{"$limit": 1}, {"$project": {"h": {"$toHashedIndexKey": "$_id"}}}]))
    except OperationFailure as exc:
        if exc.code in (168, 31325, 15999) or "toHashedIndexKey" in str(exc):
            return False
        raise
    return True
