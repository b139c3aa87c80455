"""The change-event model: :class:`ChangeEvent` and its parts, in native BSON types."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import attrs
import bson
from bson import json_util
from bson.codec_options import DEFAULT_CODEC_OPTIONS, CodecOptions
from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp

__all__ = ["ChangeEvent", "FullDocument", "OperationType", "UpdateDescription", "document_key_string"]

T = TypeVar("T")


class OperationType(str, enum.Enum):
    """``operationType`` values of MongoDB change events.

    Unknown values from newer servers are kept as plain strings on :attr:`ChangeEvent.operation_type`.
    """

    INSERT = "insert"
    UPDATE = "update"
    REPLACE = "replace"
    DELETE = "delete"
    DROP = "drop"
    RENAME = "rename"
    DROP_DATABASE = "dropDatabase"
    INVALIDATE = "invalidate"
    #: A document read by the initial snapshot (``Bus(snapshot=...)``), not a change.
    SNAPSHOT = "snapshot"

    def __str__(self) -> str:
        return self.value


class FullDocument(str, enum.Enum):
    """The change stream's ``fullDocument`` option."""

    DEFAULT = "default"
    UPDATE_LOOKUP = "updateLookup"
    WHEN_AVAILABLE = "whenAvailable"
    REQUIRED = "required"

    def __str__(self) -> str:
        return self.value


_MISSING = object()


@attrs.frozen
class UpdateDescription:
    """What an ``update`` changed.

    :ivar updated_fields: dotted path to new value.
    :ivar removed_fields: dotted paths removed.
    :ivar truncated_arrays: ``{"field": path, "newSize": n}`` per truncated array.
    :ivar disambiguated_paths: path components where a dotted path is ambiguous (``showExpandedEvents``).
    :ivar updated_fields_dropped: ``True`` when ``max_updated_fields_size`` dropped ``updated_fields``;
        read the full document instead.
    """

    updated_fields: Mapping[str, Any] = attrs.field(factory=dict)
    removed_fields: tuple[str, ...] = ()
    truncated_arrays: tuple[Mapping[str, Any], ...] = ()
    disambiguated_paths: Mapping[str, Any] = attrs.field(factory=dict)
    updated_fields_dropped: bool = False

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> UpdateDescription:
        return cls(
            updated_fields=raw.get("updatedFields") or {},
            removed_fields=tuple(raw.get("removedFields") or ()),
            truncated_arrays=tuple(raw.get("truncatedArrays") or ()),
            disambiguated_paths=raw.get("disambiguatedPaths") or {},
        )

    @property
    def is_empty(self) -> bool:
        """No field was set, removed or truncated."""
        return not (
            self.updated_fields or self.removed_fields or self.truncated_arrays or self.updated_fields_dropped
        )

    def has_field(self, path: str) -> bool:
        """Whether ``path`` (or a path below it) was updated."""
        prefix = path + "."
        return any(k == path or k.startswith(prefix) for k in self.updated_fields)

    def has_removed_field(self, path: str) -> bool:
        """Whether ``path`` was removed."""
        return path in self.removed_fields

    @overload
    def field(self, path: str) -> Any: ...

    @overload
    def field(self, path: str, type: type[T]) -> T | None: ...

    def field(self, path: str, type: Any = None) -> Any:
        """The new value at ``path``, or ``None`` when it was not updated.

        With ``type``, numbers are coerced (``int`` from ``Int64`` or an integral float,
        ``float`` from any number or ``Decimal128``); other mismatches raise ``TypeError``.
        """
        value = self.updated_fields.get(path, _MISSING)
        if value is _MISSING:
            # A nested path inside an updated sub-document: {"a": {"b": 1}} answers "a.b".
            for key, sub in self.updated_fields.items():
                if path.startswith(key + "."):
                    value = _walk(sub, path[len(key) + 1 :].split("."))
                    break
        if value is _MISSING or value is None:
            return None
        return value if type is None else _coerce(value, type, path)


def _walk(value: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _coerce(value: Any, target: type[Any], path: str) -> Any:
    if isinstance(value, target) and not (target is int and isinstance(value, bool)):
        return value
    from bson.decimal128 import Decimal128

    if target is float and isinstance(value, (int, Decimal128)) and not isinstance(value, bool):
        return float(value.to_decimal() if isinstance(value, Decimal128) else value)
    if target is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if target is int and isinstance(value, Decimal128):
        dec = value.to_decimal()
        if dec == dec.to_integral_value():
            return int(dec)
    raise TypeError(f"updated field {path!r} is {type(value).__name__}, not {target.__name__}")


def document_key_string(key: Mapping[str, Any] | None) -> str:
    """The document key as a short string (the seed's ``formatDocumentKey``): ObjectId as hex, ids as text."""
    if not key:
        return ""
    value = key.get("_id", _MISSING) if len(key) == 1 else _MISSING
    if value is _MISSING:
        return json_util.dumps(key, json_options=json_util.RELAXED_JSON_OPTIONS)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    from bson import ObjectId
    from bson.binary import Binary

    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, (bytes, Binary)):
        return bytes(value).hex()
    return json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS)


@attrs.frozen(slots=False)
class ChangeEvent:
    """One change event, as the server sent it, with native BSON values.

    :ivar id: the resume token's ``_data`` (a stable, unique event id).
    :ivar resume_token: the full resume token document (``_id``).
    :ivar operation_type: an :class:`OperationType`, or the raw string for types this library does not know.
    :ivar cluster_time: the event's :class:`bson.timestamp.Timestamp` (full precision).
    :ivar wall_time: server wall-clock time of the event (MongoDB 6.0+), else ``None``.
    :ivar raw: the change document exactly as received.

    A change document read as :class:`~bson.raw_bson.RawBSONDocument` (the watched
    collection's ``document_class``) is decoded on access: the fields the bus needs
    (``id``, ``resume_token``, ``operation_type``, ``document_key``, ``cluster_time``)
    when it arrives, every other field (``full_document``, ``raw`` ...) the first time
    it is read, into plain dicts. An event nobody reads never decodes its documents.
    The event behaves the same either way (equality, ``repr``, pickling, ``attrs.evolve``).
    """

    id: str
    resume_token: Mapping[str, Any]
    operation_type: OperationType | str
    database: str
    collection: str | None
    document_key: Mapping[str, Any] | None
    full_document: Mapping[str, Any] | None
    full_document_before_change: Mapping[str, Any] | None
    update_description: UpdateDescription | None
    cluster_time: Timestamp | None
    wall_time: datetime | None
    txn_number: int | None
    lsid: Mapping[str, Any] | None
    to: Mapping[str, Any] | None
    raw: Mapping[str, Any] = attrs.field(repr=False, eq=False)

    @property
    def namespace(self) -> str:
        """``db.collection`` (``db`` for database-wide events)."""
        return f"{self.database}.{self.collection}" if self.collection else self.database

    @property
    def document_id(self) -> Any:
        """``document_key["_id"]``, or ``None``."""
        return self.document_key.get("_id") if self.document_key else None

    @classmethod
    def from_raw(
        cls, raw: Mapping[str, Any], default_db: str = "", default_coll: str | None = None
    ) -> ChangeEvent:
        """Build an event from a raw change document (a dict, or a ``RawBSONDocument`` decoded lazily)."""
        if type(raw) is not dict and _is_raw_bson(raw):  # a dict skips the ABC check (0.4 us)
            return cls.from_raw_bson(cast(RawBSONDocument, raw), default_db, default_coll)
        token = raw["_id"]
        data = token.get("_data") if type(token) is dict or isinstance(token, Mapping) else None
        ns = raw.get("ns") or {}
        op = raw.get("operationType", "")
        desc = raw.get("updateDescription")
        get = raw.get
        event_id = data if isinstance(data, str) else json_util.dumps(token)
        operation_type = _OPS.get(op, op)
        description = UpdateDescription.from_raw(desc) if desc is not None else None
        if cls is not ChangeEvent:  # a subclass may validate or add fields: use its __init__
            return cls(
                event_id,
                token,
                operation_type,
                ns.get("db") or default_db,
                ns.get("coll") or default_coll,
                get("documentKey"),
                get("fullDocument"),
                get("fullDocumentBeforeChange"),
                description,
                get("clusterTime"),
                get("wallTime"),
                get("txnNumber"),
                get("lsid"),
                get("to"),
                raw,
            )
        # This runs once per event: one dict as the instance's __dict__ skips the frozen
        # class's per-field __setattr__ indirection (slots filled one by one cost half again
        # as much). tests/test_events.py checks that these are exactly the fields, in order.
        event = _new(cls)
        _set_attr(
            event,
            "__dict__",
            {
                "id": event_id,
                "resume_token": token,
                "operation_type": operation_type,
                "database": ns.get("db") or default_db,
                "collection": ns.get("coll") or default_coll,
                "document_key": get("documentKey"),
                "full_document": get("fullDocument"),
                "full_document_before_change": get("fullDocumentBeforeChange"),
                "update_description": description,
                "cluster_time": get("clusterTime"),
                "wall_time": get("wallTime"),
                "txn_number": get("txnNumber"),
                "lsid": get("lsid"),
                "to": get("to"),
                "raw": raw,
            },
        )
        return event

    @classmethod
    def from_raw_bson(
        cls,
        raw: RawBSONDocument,
        default_db: str = "",
        default_coll: str | None = None,
        codec_options: CodecOptions[Any] = DEFAULT_CODEC_OPTIONS,
    ) -> ChangeEvent:
        """Build an event from a change document as raw BSON, decoding each field when first read.

        :param codec_options: how to decode its fields (the watched collection's options,
            with ``document_class=dict``).

        .. versionadded:: 0.1.0
        """
        top = dict(raw.items())  # its top level (sub-documents stay raw): plain dict lookups below
        token = decoded(top["_id"], codec_options)
        data = token.get("_data") if isinstance(token, Mapping) else None
        op = top.get("operationType", "")
        if cls is not ChangeEvent:  # a subclass may validate or add fields: give it every field
            return cls.from_raw(decoded(raw, codec_options), default_db, default_coll)
        event = _new(_LazyChangeEvent)
        # The bus reads these fields for every event (its lane, window slot and filters), so
        # they are decoded now; _Lazy decodes every other field when it is first read.
        fields = {
            "id": data if isinstance(data, str) else json_util.dumps(token),
            "resume_token": token,
            "operation_type": _OPS.get(op, op),
            "document_key": decoded(top.get("documentKey"), codec_options),
            "cluster_time": top.get("clusterTime"),
            _LAZY: _Lazy(raw, top, codec_options, default_db, default_coll),
        }
        if "updateDescription" not in top:  # the bus reads it for every event: no lazy lookup for "none"
            fields["update_description"] = None
        _set_attr(event, "__dict__", fields)
        return event

    def __getstate__(self) -> dict[str, Any]:
        """Every field, decoded (a pickled or copied event does not depend on raw BSON)."""
        state = self.__dict__
        if _LAZY not in state:
            return state
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    def to_dict(self) -> dict[str, Any]:
        """The event as a dict of its fields (without ``raw``), values still native BSON."""
        desc = self.update_description
        return {  # spelled out: this runs once per typed delivery
            "id": self.id,
            "resume_token": self.resume_token,
            "operation_type": _OP_NAMES.get(self.operation_type, self.operation_type),
            "database": self.database,
            "collection": self.collection,
            "document_key": self.document_key,
            "full_document": self.full_document,
            "full_document_before_change": self.full_document_before_change,
            "update_description": attrs.asdict(desc, recurse=False) if desc is not None else None,
            "cluster_time": self.cluster_time,
            "wall_time": self.wall_time,
            "txn_number": self.txn_number,
            "lsid": self.lsid,
            "to": self.to,
            "namespace": self.namespace,
        }

    def to_json(self) -> str:
        """The event as relaxed Extended JSON."""
        return json_util.dumps(self.to_dict(), json_options=json_util.RELAXED_JSON_OPTIONS)


class _LazyChangeEvent(ChangeEvent):
    """A :class:`ChangeEvent` read from raw BSON, whose fields are decoded when first read.

    A class of its own because a class that defines ``__getattr__`` makes *every* attribute
    lookup of its instances slower (CPython swaps its fast generic lookup for a hook): on
    ``ChangeEvent`` itself that cost the hot path 5 to 9% (the bus reads a dozen fields per
    event). It compares, hashes and prints as the decoded event would.
    """

    if not TYPE_CHECKING:  # hidden from type checkers: a __getattr__ would make any attribute name valid

        def __getattr__(self, name: str) -> Any:
            # Python calls this only when normal lookup failed: for a field nobody read yet.
            # Decode it once and keep it in __dict__.
            lazy = self.__dict__.get(_LAZY)
            decode = _LAZY_FIELDS.get(name)
            if lazy is None or decode is None:
                raise AttributeError(f"'ChangeEvent' object has no attribute {name!r}")
            # setdefault: two workers decoding the same field at once both get the first value.
            return self.__dict__.setdefault(name, decode(lazy))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChangeEvent):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _EQ_NAMES)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = ChangeEvent.__hash__

    def to_dict(self) -> dict[str, Any]:
        state = self.__dict__
        lazy = state.get(_LAZY)
        if lazy is not None:  # decode what nobody read yet in one pass, not one __getattr__ each
            for name, decode in _LAZY_FIELDS.items():
                if name not in state and name != "raw":
                    state.setdefault(name, decode(lazy))
        return super().to_dict()

    def __reduce_ex__(self, protocol: Any) -> Any:
        # A pickle or copy is the decoded ChangeEvent: every field, no raw BSON behind it.
        return _decoded_event, (self.__getstate__(),)


def _is_raw_bson(value: object) -> bool:
    return isinstance(value, RawBSONDocument)


def _decoded_event(state: dict[str, Any]) -> ChangeEvent:
    event = _new(ChangeEvent)
    _set_attr(event, "__dict__", dict(state))
    return event


# attrs' repr names the class: a lazy event prints as the ChangeEvent it stands for.
_LazyChangeEvent.__name__ = _LazyChangeEvent.__qualname__ = "ChangeEvent"
_EQ_NAMES = tuple(a.name for a in attrs.fields(ChangeEvent) if a.eq)


def decoded(value: Any, codec_options: CodecOptions[Any]) -> Any:
    """A raw BSON (sub-)document as a plain document, decoded with ``codec_options``; else ``value``."""
    # type() first: an isinstance() miss against the Mapping ABC costs more than the decode.
    if type(value) is RawBSONDocument or (value is not None and isinstance(value, RawBSONDocument)):
        return bson.decode(value.raw, codec_options)
    return value


class _Lazy:
    """What a lazily decoded event decodes its other fields from."""

    __slots__ = ("default_coll", "default_db", "ns", "options", "raw", "top")

    def __init__(
        self,
        raw: RawBSONDocument,
        top: dict[str, Any],
        options: CodecOptions[Any],
        default_db: str,
        default_coll: str | None,
    ) -> None:
        self.raw = raw
        self.top = top
        self.options = options
        self.default_db = default_db
        self.default_coll = default_coll
        self.ns: Mapping[str, Any] | None = None  # decoded once for database and collection

    def field(self, key: str) -> Any:
        return decoded(self.top.get(key), self.options)

    def namespace(self, key: str) -> Any:
        ns = self.ns
        if ns is None:
            ns = self.ns = self.field("ns") or {}
        return ns.get(key)


def _update_description(lazy: _Lazy) -> UpdateDescription | None:
    desc = lazy.field("updateDescription")
    return UpdateDescription.from_raw(desc) if desc is not None else None


_LAZY = "_raw_bson"  # the __dict__ key of a lazily decoded event's _Lazy (never a field name)
_LAZY_FIELDS: dict[str, Any] = {
    "database": lambda lazy: lazy.namespace("db") or lazy.default_db,
    "collection": lambda lazy: lazy.namespace("coll") or lazy.default_coll,
    "full_document": lambda lazy: lazy.field("fullDocument"),
    "full_document_before_change": lambda lazy: lazy.field("fullDocumentBeforeChange"),
    "update_description": _update_description,
    "wall_time": lambda lazy: lazy.top.get("wallTime"),
    "txn_number": lambda lazy: lazy.top.get("txnNumber"),
    "lsid": lambda lazy: lazy.field("lsid"),
    "to": lambda lazy: lazy.field("to"),
    "raw": lambda lazy: decoded(lazy.raw, lazy.options),
}
_FIELD_NAMES = tuple(f.name for f in attrs.fields(ChangeEvent))

_OPS: dict[str, OperationType] = {o.value: o for o in OperationType}
_OP_NAMES: dict[OperationType | str, str] = {o: o.value for o in OperationType}  # str() without a call
_new = object.__new__
_set_attr = object.__setattr__
