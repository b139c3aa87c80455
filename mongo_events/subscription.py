"""Subscriptions: a callback plus what it receives and how its failures are handled."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal

from .decoding import Decoder, document_hint
from .delivery import Delivery
from .errors import ConfigurationError, DecodeError
from .events import ChangeEvent, OperationType
from .idempotency.guard import Idempotency
from .options import check_choice, check_has_method, check_int, invalid
from .retrying import RetryBackoff

__all__ = ["DATA_OPERATIONS", "EXPANDED_OPERATIONS", "OnExhausted", "Subscription"]

OnExhausted = Literal["stop", "skip"]

#: Operations a typed (``payload=``) subscription receives unless it names others.
DATA_OPERATIONS = frozenset({"insert", "update", "replace", "delete"})
_KNOWN_OPERATIONS = frozenset(o.value for o in OperationType)
#: DDL events a stream carries only with ``show_expanded_events=True`` (MongoDB 6.0+).
EXPANDED_OPERATIONS = frozenset(
    {
        "create",
        "createIndexes",
        "dropIndexes",
        "modify",
        "shardCollection",
        "reshardCollection",
        "refineCollectionShardKey",
    }
)


class Subscription:
    """One registered callback. Built by :meth:`mongo_events.Bus.subscribe`.

    :ivar name: unique within its bus; names the subscription in logs, metrics and dead letters.
    """

    __slots__ = (
        "callback",
        "full_document_only",
        "idempotency",
        "index",
        "max_retries",
        "name",
        "on_exhausted",
        "operations",
        "payload",
        "retry_backoff",
        "wants_delivery",
    )

    def __init__(
        self,
        callback: Callable[..., Any],
        *,
        name: str | None = None,
        payload: Any = None,
        operations: Collection[str] | None = None,
        max_retries: int = 5,
        retry_backoff: RetryBackoff | None = None,
        on_exhausted: OnExhausted = "stop",
        full_document_only: bool = False,
        index: int = 0,
        show_expanded_events: bool = False,
        idempotency: Idempotency | None = None,
    ) -> None:
        if not callable(callback):
            raise ConfigurationError(f"subscribe() needs a callable, got {callback!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise invalid("name", name, "a non-empty str or None")
        check_int("max_retries", max_retries, 0)
        if retry_backoff is not None:
            check_has_method("retry_backoff", retry_backoff, "delay", "a mongo_events.RetryBackoff")
        check_choice("on_exhausted", on_exhausted, ["stop", "skip"])
        ops: frozenset[str] | None
        if operations is None:
            ops = DATA_OPERATIONS if payload is not None else None
        else:
            ops = _check_operations(operations, show_expanded_events)
        self.callback = callback
        self.name = name or getattr(callback, "__qualname__", None) or repr(callback)
        self.payload = payload
        self.operations = ops
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff or RetryBackoff()
        self.on_exhausted = on_exhausted
        self.full_document_only = full_document_only
        self.wants_delivery = _takes_two(callback)
        self.index = index
        #: Claims each event's key before the callback, completes or releases it after.
        self.idempotency = idempotency

    def wants(self, event: ChangeEvent) -> bool:
        """Whether this subscription handles ``event`` at all (filtered events count as done)."""
        # OperationType is a str enum: members hash and compare as their values.
        if self.operations is not None and event.operation_type not in self.operations:
            return False
        if self.full_document_only:
            return event.full_document is not None or event.operation_type == OperationType.DELETE
        return True

    def argument(self, event: ChangeEvent, decoder: Decoder) -> Any:
        """What the callback receives: the event, the full document, or either decoded."""
        if self.full_document_only:
            if event.full_document is None:  # a delete: the key is all there is
                return event.document_key
            return (
                event.full_document
                if self.payload is None
                else decoder.decode(event.full_document, self.payload)
            )
        if self.payload is None:
            return event
        raw = event.to_dict()
        try:
            return decoder.decode(raw, self.payload)
        except DecodeError as exc:
            hinted = document_hint(exc, self.payload, raw, event.full_document)
            if hinted is exc:
                raise
            raise hinted from exc.__cause__

    def call(self, argument: Any, delivery: Delivery) -> Any:
        if self.wants_delivery:
            return self.callback(argument, delivery)
        return self.callback(argument)

    def __repr__(self) -> str:
        return f"<Subscription {self.name!r}>"


def _check_operations(operations: Any, show_expanded_events: bool) -> frozenset[str]:
    """The operation names a subscription asked for, refused unless the bus can receive each."""
    known = _KNOWN_OPERATIONS | EXPANDED_OPERATIONS if show_expanded_events else _KNOWN_OPERATIONS
    accepted = "a collection of operation names from " + ", ".join(sorted(known))
    if not show_expanded_events:
        accepted += " (DDL events such as createIndexes need show_expanded_events=True)"
    # A bare string is a collection of its letters: "insert" would mean {"i", "n", ...}.
    if isinstance(operations, (str, bytes, Mapping)) or not isinstance(operations, Collection):
        raise invalid("operations", operations, accepted + "; for one operation write {'insert'}")
    names = []
    for op in operations:
        if not isinstance(op, str):  # OperationType is a str enum
            raise invalid("operations", operations, accepted)
        names.append(op.value if isinstance(op, OperationType) else op)
    if not names:  # a subscription that can never receive anything is a mistake, not a choice
        raise invalid("operations", operations, accepted + "; at least one (or None for all)")
    unknown = sorted(set(names) - known)
    if unknown:
        raise invalid(
            "operations", operations, f"{accepted}; unknown: {', '.join(unknown)} (names are case-sensitive)"
        )
    return frozenset(names)


def _takes_two(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    if not positional:
        raise ConfigurationError(f"callback {fn!r} must take the event as its first parameter")
    if len([p for p in positional if p.default is p.empty]) > 2:
        raise ConfigurationError(f"callback {fn!r} takes too many parameters: (event) or (event, delivery)")
    return len(positional) >= 2
