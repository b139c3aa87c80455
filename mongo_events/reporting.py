"""The ``on_error`` hook: every error the bus meets, reported to one user function.

The counterpart of the Go transport's ``WithErrorHandler``. The bus calls
:func:`report_error` next to its own logging, health and metrics at each
error site; a hook that raises is logged and never breaks the bus.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import attrs

from .delivery import Delivery
from .middleware.base import Middleware

__all__ = ["ErrorContext", "ErrorHandler", "ErrorKindName", "report_error"]

log = logging.getLogger(__name__)

#: What failed: the change stream, a callback attempt, a store write or read, a dead-letter write.
ErrorKindName = Literal["stream", "handler", "store", "dead_letter"]


@attrs.frozen
class ErrorContext:
    """Where an error reported to ``on_error`` happened.

    :ivar kind: ``"stream"`` (the change stream failed or was reopened after an error),
        ``"handler"`` (a callback attempt raised, including decode errors),
        ``"store"`` (a checkpoint, ack, monitor or index write or read failed) or
        ``"dead_letter"`` (storing a dead letter failed).
    :ivar bus: the bus's name.
    :ivar subscription: the subscription's name, for handler and dead-letter errors.
    :ivar event_id: the change event's id, where one is known.
    :ivar attempt: the attempt number of a handler error (1 for the first try).
    :ivar what: a few words on what was being done (``"write checkpoint"``, ``"reconnect"``...).

    .. versionadded:: 0.1.0
    """

    kind: ErrorKindName
    bus: str
    subscription: str | None = None
    event_id: str | None = None
    attempt: int | None = None
    what: str = ""


#: ``fn(error, context)``: see :class:`ErrorContext`.
ErrorHandler = Callable[[BaseException, ErrorContext], None]


def report_error(hook: ErrorHandler | None, error: BaseException, context: ErrorContext) -> None:
    """Call ``hook(error, context)``; an exception it raises is logged, never propagated."""
    if hook is None:
        return
    try:
        hook(error, context)
    except Exception:
        log.exception(
            "on_error hook raised while reporting %s error %r; ignored, the bus goes on", context.kind, error
        )


class ErrorReporter(Middleware):
    """Reports each failed callback attempt (kind ``handler``); the bus adds it when ``on_error`` is set."""

    def __init__(self, hook: ErrorHandler, bus: str) -> None:
        self.hook = hook
        self.bus = bus

    def after_delivery(self, delivery: Delivery, error: BaseException | None, duration: float) -> None:
        if error is not None:
            what = "replay" if delivery.replay else "callback"
            context = ErrorContext(
                "handler", self.bus, delivery.subscription, delivery.event.id, delivery.attempt, what
            )
            report_error(self.hook, error, context)
