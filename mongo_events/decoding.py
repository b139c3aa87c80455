"""Decoding change documents into user types with cattrs."""

from __future__ import annotations

import dataclasses
import decimal
import uuid
from collections.abc import Mapping
from typing import Any, Protocol, TypeVar

import attrs
import cattrs
from bson.binary import OLD_UUID_SUBTYPE, UUID_SUBTYPE, Binary, UuidRepresentation
from bson.decimal128 import Decimal128
from cattrs.preconf.bson import make_converter as _make_bson_converter

from .errors import DecodeError

__all__ = ["CattrsDecoder", "Decoder", "make_converter"]  # plus helpers for subscriptions

T = TypeVar("T")


class Decoder(Protocol):
    """Turns a document into an instance of ``type_``; raises :class:`DecodeError` on failure."""

    def decode(self, value: Any, type_: type[T]) -> T: ...


def make_converter() -> cattrs.Converter:
    """The converter mongo-events uses: ``cattrs.preconf.bson`` with native BSON values kept.

    It also structures ``Decimal128`` (or a numeric string) into :class:`decimal.Decimal`
    and binary UUIDs (subtype 3 or 4, or a UUID string) into :class:`uuid.UUID`.
    Start from it to register your own hooks, then pass ``decoder=CattrsDecoder(conv)``.
    """
    converter = _make_bson_converter()
    converter.register_structure_hook(decimal.Decimal, _structure_decimal)
    converter.register_structure_hook(uuid.UUID, _structure_uuid)
    return converter


def _structure_decimal(value: Any, _: Any) -> decimal.Decimal:
    if isinstance(value, Decimal128):
        return value.to_decimal()
    if isinstance(value, decimal.Decimal):
        return value
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return decimal.Decimal(value)
        except decimal.InvalidOperation:
            pass
    elif isinstance(value, float):
        return decimal.Decimal(repr(value))
    raise ValueError(f"expected a Decimal128 or a decimal number, got {type(value).__name__} {value!r}")


def _structure_uuid(value: Any, _: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, Binary) and value.subtype in (UUID_SUBTYPE, OLD_UUID_SUBTYPE) and len(value) == 16:
        if value.subtype == UUID_SUBTYPE:
            return value.as_uuid(UuidRepresentation.STANDARD)
        return value.as_uuid(UuidRepresentation.PYTHON_LEGACY)
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise ValueError(
        f"expected a binary UUID (subtype 4) or a UUID string, got {type(value).__name__} {value!r}"
    )


class CattrsDecoder:
    """A :class:`Decoder` built on a cattrs converter; errors carry readable paths (``$.items[0].qty``).

    Documents are first structured by a copy of ``converter`` without cattrs' detailed
    validation (about half the cost); only a document that fails is structured again
    by ``converter`` itself, to report every error with its path. The copy is taken at
    the first decode: register your hooks on the converter before the bus starts.
    """

    def __init__(self, converter: cattrs.Converter | None = None) -> None:
        self.converter = converter or make_converter()
        self._fast: cattrs.Converter | None = None
        self._hooks: dict[Any, Any] = {}  # type -> the fast converter's structure hook

    def _fast_converter(self) -> cattrs.Converter:
        fast = self._fast
        if fast is None:
            conv = self.converter
            fast = (
                conv.copy(detailed_validation=False) if getattr(conv, "detailed_validation", False) else conv
            )
            self._fast = fast
        return fast

    def _hook(self, type_: Any) -> Any:
        """The fast converter's structure function for ``type_``, looked up once per type."""
        try:
            return self._hooks[type_]
        except KeyError:
            pass
        except TypeError:  # an unhashable type argument: no cache
            return self._fast_converter().structure
        fast = self._fast_converter()
        lookup = getattr(fast, "get_structure_hook", None)  # cattrs 24+; else dispatch each time
        hook = lookup(type_) if lookup is not None else fast.structure
        self._hooks[type_] = hook
        return hook

    def decode(self, value: Any, type_: type[T]) -> T:
        if type_ is dict or type_ is Any:  # no structuring asked for
            return value  # type: ignore[no-any-return]
        try:
            return self._hook(type_)(value, type_)  # type: ignore[no-any-return]
        except Exception:
            pass  # structure it again below, for the detailed report
        try:
            return self.converter.structure(value, type_)
        except Exception as exc:
            errors = _readable(exc)
            name = getattr(type_, "__name__", repr(type_))
            raise DecodeError(
                f"cannot decode into {name}: {'; '.join(errors)}", errors=errors, raw=value
            ) from exc


def _readable(exc: Exception) -> list[str]:
    try:
        return list(cattrs.transform_error(exc, path="$"))
    except Exception:  # transform_error only knows cattrs' own exception groups
        return [f"{type(exc).__name__}: {exc} @ $"]


def required_fields(type_: Any) -> frozenset[str] | None:
    """Names of the fields ``type_`` needs (attrs, dataclass, TypedDict), or None when unknown."""
    if attrs.has(type_):
        return frozenset(f.alias or f.name for f in attrs.fields(type_) if f.default is attrs.NOTHING)
    if dataclasses.is_dataclass(type_) and isinstance(type_, type):
        return frozenset(
            f.name
            for f in dataclasses.fields(type_)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.init
        )
    keys = getattr(type_, "__required_keys__", None)
    return frozenset(keys) if isinstance(keys, frozenset) else None


def document_hint(error: DecodeError, type_: Any, event: Mapping[str, Any], document: Any) -> DecodeError:
    """``error`` again, saying so when ``type_`` looks like the document rather than the change event.

    ``payload=T`` decodes the whole change event; a ``T`` whose required fields are missing
    from the event but present in ``fullDocument`` was meant for ``full_document_only=True``.
    """
    needed = required_fields(type_)
    if not needed or not isinstance(document, Mapping) or needed <= set(event) or not needed <= set(document):
        return error
    name = getattr(type_, "__name__", repr(type_))
    hint = DecodeError(
        f"{error}. {name} looks like the changed document, not the change event: payload= decodes the "
        "change event unless the bus has full_document_only=True (then it decodes fullDocument)",
        errors=error.errors,
        raw=error.raw,
    )
    return hint
