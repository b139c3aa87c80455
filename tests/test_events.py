"""The change-event model."""

from __future__ import annotations

import copy
import datetime
import json
import pickle
from typing import Any

import bson
import pytest
from bson import Decimal128, Int64, ObjectId
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp

from mongo_events import ChangeEvent, OperationType, UpdateDescription, events
from mongo_events.events import document_key_string

RAW = {
    "_id": {"_data": "resume-123"},
    "operationType": "update",
    "clusterTime": Timestamp(1700000000, 7),
    "wallTime": datetime.datetime(2023, 11, 14, 22, 13, 20),
    "ns": {"db": "shop", "coll": "orders"},
    "documentKey": {"_id": "order-7"},
    "updateDescription": {
        "updatedFields": {
            "status": "shipped",
            "qty": Int64(3),
            "price": Decimal128("9.50"),
            "meta": {"a": {"b": 1}},
        },
        "removedFields": ["hold"],
        "truncatedArrays": [],
    },
    "txnNumber": Int64(4),
    "lsid": {"id": "x"},
}


def test_from_raw_maps_every_field() -> None:
    ev = ChangeEvent.from_raw(RAW)
    assert ev.id == "resume-123"
    assert ev.resume_token == {"_data": "resume-123"}
    assert ev.operation_type is OperationType.UPDATE
    assert ev.namespace == "shop.orders"
    assert ev.document_key == {"_id": "order-7"} and ev.document_id == "order-7"
    assert ev.cluster_time == Timestamp(1700000000, 7)  # full precision, increment kept
    assert ev.txn_number == 4 and ev.lsid == {"id": "x"}
    assert ev.update_description is not None
    assert ev.update_description.removed_fields == ("hold",)
    assert ev.raw is RAW


def test_unknown_operation_types_are_kept_as_strings() -> None:
    ev = ChangeEvent.from_raw({"_id": {"_data": "1"}, "operationType": "createIndexes", "ns": {"db": "d"}})
    assert ev.operation_type == "createIndexes" and ev.collection is None and ev.namespace == "d"


def test_defaults_fill_missing_namespace() -> None:
    ev = ChangeEvent.from_raw({"_id": {"_data": "1"}, "operationType": "invalidate"}, "shop", "orders")
    assert ev.namespace == "shop.orders"


def test_update_description_helpers() -> None:
    desc = ChangeEvent.from_raw(RAW).update_description
    assert desc is not None
    assert desc.has_field("status") and desc.has_field("meta") and not desc.has_field("stat")
    assert desc.has_removed_field("hold") and not desc.has_removed_field("status")
    assert desc.field("qty", int) == 3
    assert desc.field("qty", float) == 3.0
    assert desc.field("price", float) == 9.5
    assert desc.field("meta.a.b", int) == 1  # a path inside an updated sub-document
    assert desc.field("missing", int) is None
    with pytest.raises(TypeError, match="status"):
        desc.field("status", int)
    assert UpdateDescription(updated_fields={"n": 2.0}).field("n", int) == 2
    assert UpdateDescription().is_empty
    assert not UpdateDescription(truncated_arrays=({"field": "a", "newSize": 1},)).is_empty


def test_to_json_is_relaxed_extended_json() -> None:
    oid = ObjectId()
    ev = ChangeEvent.from_raw(
        {**RAW, "documentKey": {"_id": oid}, "fullDocument": {"_id": oid, "n": Int64(1)}}
    )
    data = json.loads(ev.to_json())
    assert data["document_key"] == {"_id": {"$oid": str(oid)}}
    assert data["full_document"]["n"] == 1
    assert data["operation_type"] == "update" and data["namespace"] == "shop.orders"
    assert data["cluster_time"] == {"$timestamp": {"t": 1700000000, "i": 7}}
    assert "raw" not in data


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (None, ""),
        ({"_id": "order-7"}, "order-7"),
        ({"_id": 42}, "42"),
        ({"_id": ObjectId("65a1b2c3d4e5f60718293a4b")}, "65a1b2c3d4e5f60718293a4b"),
        ({"_id": b"\x01\xff"}, "01ff"),
    ],
)
def test_document_key_string(key: dict[str, object] | None, expected: str) -> None:
    assert document_key_string(key) == expected


def test_to_dict_has_every_field_but_raw() -> None:
    import attrs

    ev = ChangeEvent.from_raw(RAW)
    out = ev.to_dict()
    assert set(out) == {f.name for f in attrs.fields(ChangeEvent)} - {"raw"} | {"namespace"}
    assert out["operation_type"] == "update" and type(out["operation_type"]) is str
    assert out["namespace"] == "shop.orders"
    assert out["update_description"]["removed_fields"] == ("hold",)
    assert out["cluster_time"] == Timestamp(1700000000, 7)


def test_from_raw_fills_every_field_like_init() -> None:
    import attrs

    ev = ChangeEvent.from_raw(RAW, "d", "c")
    assert list(vars(ev)) == [f.name for f in attrs.fields(ChangeEvent)]  # no field missed, none extra
    values = {f.name: getattr(ev, f.name) for f in attrs.fields(ChangeEvent)}
    assert ChangeEvent(**values) == ev
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ev.id = "x"  # type: ignore[misc]


# -- change documents read as raw BSON: decoded on access ---------------------------------


def _raw_bson(document: dict[str, object], tz_aware: bool = False) -> RawBSONDocument:
    options = CodecOptions(document_class=RawBSONDocument, tz_aware=tz_aware)
    return RawBSONDocument(
        bson.encode({**document, "fullDocument": {"_id": "order-7", "n": Int64(1)}}), options
    )


class _CountingDecodes:
    """Wraps ``mongo_events.events.decoded``: records each raw sub-document it decodes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.decoded: list[dict[str, object]] = []
        inner = events.decoded

        def counting(value: object, options: CodecOptions[Any]) -> object:
            out = inner(value, options)
            if isinstance(value, RawBSONDocument):
                self.decoded.append(out)  # type: ignore[arg-type]
            return out

        monkeypatch.setattr(events, "decoded", counting)

    def documents(self) -> list[dict[str, object]]:
        """The full documents decoded so far (they alone carry ``n``)."""
        return [d for d in self.decoded if "n" in d]


def test_a_raw_event_decodes_what_the_bus_reads_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = _CountingDecodes(monkeypatch)
    ev = ChangeEvent.from_raw(_raw_bson(RAW))
    # What the bus reads for every event, without touching the documents.
    assert ev.id == "resume-123" and ev.resume_token == {"_data": "resume-123"}
    assert ev.operation_type is OperationType.UPDATE and ev.cluster_time == Timestamp(1700000000, 7)
    assert ev.document_key == {"_id": "order-7"} and type(ev.document_key) is dict
    assert counter.documents() == []
    # A callback that reads the full document decodes it, once.
    assert ev.full_document == {"_id": "order-7", "n": 1} and type(ev.full_document) is dict
    assert ev.full_document is ev.full_document
    assert len(counter.documents()) == 1


def test_a_raw_event_equals_the_decoded_one_field_by_field() -> None:
    import attrs

    plain = bson.decode(bson.encode({**RAW, "fullDocument": {"_id": "order-7", "n": Int64(1)}}))
    lazy, eager = ChangeEvent.from_raw(_raw_bson(RAW), "d", "c"), ChangeEvent.from_raw(plain, "d", "c")
    assert lazy == eager and repr(lazy) == repr(eager)
    for field in attrs.fields(ChangeEvent):
        assert getattr(lazy, field.name) == getattr(eager, field.name), field.name
    assert lazy.raw == plain and type(lazy.raw) is dict  # the whole change, decoded when asked for
    assert lazy.to_dict() == eager.to_dict() and lazy.to_json() == eager.to_json()
    assert ChangeEvent.from_raw(_raw_bson({**RAW, "ns": {"db": "x"}}), "d", "c").namespace == "x.c"
    with pytest.raises(AttributeError):
        lazy.no_such_field  # type: ignore[attr-defined]  # noqa: B018


def test_a_raw_event_decodes_with_the_collection_codec_options() -> None:
    options = CodecOptions(tz_aware=True)
    ev = ChangeEvent.from_raw_bson(_raw_bson(RAW, tz_aware=True), codec_options=options)
    assert ev.wall_time is not None and ev.wall_time.tzinfo is not None
    assert ev.raw["wallTime"].tzinfo is not None


@pytest.mark.parametrize("copier", [lambda e: pickle.loads(pickle.dumps(e)), copy.copy, copy.deepcopy])
def test_a_raw_event_pickles_and_copies_as_a_decoded_one(copier: Any) -> None:
    import attrs

    ev = ChangeEvent.from_raw(_raw_bson(RAW))
    assert ev.operation_type is OperationType.UPDATE  # some fields read, the rest not yet
    other = copier(ev)
    assert other == ev and other.raw == ev.raw
    assert list(vars(other)) == [f.name for f in attrs.fields(ChangeEvent)]  # every field, no raw BSON
    assert attrs.evolve(ChangeEvent.from_raw(_raw_bson(RAW)), id="x").full_document == ev.full_document
