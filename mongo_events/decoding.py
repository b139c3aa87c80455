"""Decoding change documents into user types with cattrs."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import cattrs
from cattrs.preconf.bson import make_converter as _make_bson_converter

from .errors import DecodeError

__all__ = ["CattrsDecoder", "Decoder", "make_converter"]

T = TypeVar("T")


class Decoder(Protocol):
    """Turns a document into an instance of ``type_``; raises :class:`DecodeError` on failure."""

    def decode(self, value: Any, type_: type[T]) -> T: ...


def make_converter() -> cattrs.Converter:
    """The converter mongo-events uses: ``cattrs.preconf.bson`` with native BSON values kept.

    Start from it to register your own hooks, then pass ``decoder=CattrsDecoder(conv)``.
    """
    return _make_bson_converter()


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
            fast = conv.copy(detailed_validation=False) if getattr(conv, "detailed_validation", False) else conv
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
            raise DecodeError(f"cannot decode into {name}: {'; '.join(errors)}", errors=errors, raw=value) from exc


def _readable(exc: Exception) -> list[str]:
    try:
        return list(cattrs.transform_error(exc, path="$"))
    except Exception:  # transform_error only knows cattrs' own exception groups
        return [f"{type(exc).__name__}: {exc} @ $"]
