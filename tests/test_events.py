"""The change-event model."""

from __future__ import annotations

import datetime
import json

import pytest
from bson import Decimal128, Int64, ObjectId
from bson.timestamp import Timestamp

from mongo_events import ChangeEvent, OperationType, UpdateDescription
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
