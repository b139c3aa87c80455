"""Subscriptions: a callback plus what it receives and how its failures are handled."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from typing import Any, Literal

from .decoding import Decoder
from .delivery import Delivery
from .errors import ConfigurationError
from .events import ChangeEvent, OperationType
from .idempotency.guard import Idempotency
from .retrying import RetryBackoff

__all__ = ["DATA_OPERATIONS", "OnExhausted", "Subscription"]

OnExhausted = Literal["stop", "skip"]

#: Operations a typed (``payload=``) subscription receives unless it names others.
DATA_OPERATIONS = frozenset({"insert", "update", "replace", "delete"})
_KNOWN_OPERATIONS = frozenset(o.value for o in OperationType)


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
        idempotency: Idempotency | None = None,
    ) -> None:
        if not callable(callback):
            raise ConfigurationError(f"subscribe() needs a callable, got {callback!r}")
        if max_retries < 0:
            raise ConfigurationError(f"max_retries must be >= 0, got {max_retries}")
        if on_exhausted not in ("stop", "skip"):
            raise ConfigurationError(f"on_exhausted must be 'stop' or 'skip', got {on_exhausted!r}")
        ops: frozenset[str] | None
        if operations is None:
            ops = DATA_OPERATIONS if payload is not None else None
        else:
            ops = frozenset(str(o) for o in operations)
            unknown = ops - _KNOWN_OPERATIONS
            if unknown and all(o.lower() in {k.lower() for k in _KNOWN_OPERATIONS} for o in unknown):
                raise ConfigurationError(f"operation names are case-sensitive: {sorted(unknown)}; use {sorted(_KNOWN_OPERATIONS)}")
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
            return event.full_document if self.payload is None else decoder.decode(event.full_document, self.payload)
        if self.payload is None:
            return event
        return decoder.decode(event.to_dict(), self.payload)

    def call(self, argument: Any, delivery: Delivery) -> Any:
        if self.wants_delivery:
            return self.callback(argument, delivery)
        return self.callback(argument)

    def __repr__(self) -> str:
        return f"<Subscription {self.name!r}>"


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
