"""The middleware base class and how a chain of them is run."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..delivery import Delivery
from ..errors import Skip

__all__ = ["Middleware", "run_after", "run_before"]

log = logging.getLogger(__name__)


class Middleware:
    """Override any hook. ``before_*`` hooks run in order, ``after_*`` hooks in reverse.

    A hook that raises is logged and skipped: a broken middleware never stops
    event handling. The one exception is :class:`mongo_events.Skip` raised by
    ``before_delivery``: it finishes the delivery without calling the callback.

    .. versionadded:: 0.1.0
    """

    def before_delivery(self, delivery: Delivery) -> None:
        """Called on the worker thread before each attempt.

        Raise :class:`mongo_events.Skip` to finish the delivery without calling the
        callback (and without the ``before_delivery`` of later middleware): it is done,
        not an error, not retried, not dead-lettered. ``after_delivery_skipped`` follows.
        """

    def after_delivery(self, delivery: Delivery, error: BaseException | None, duration: float) -> None:
        """Called after each attempt with the callback's exception (or ``None``) and its duration in seconds."""

    def after_delivery_skipped(self, delivery: Delivery, skip: Skip) -> None:
        """Called instead of ``after_delivery`` when the delivery finished without the callback:
        a middleware raised :class:`mongo_events.Skip`, or the event is a
        :class:`mongo_events.Duplicate` of one already processed (``idempotency=``).

        By default it calls ``after_delivery(delivery, None, 0.0)``: to a middleware that
        does not know about skipping, a skipped delivery is a successful one.

        .. versionadded:: 0.1.0
        """
        self.after_delivery(delivery, None, 0.0)

    def after_retry_scheduled(self, delivery: Delivery, error: BaseException, delay: float) -> None:
        """Called when a failed attempt will be retried after ``delay`` seconds."""

    def after_dead_letter(self, delivery: Delivery, error: BaseException) -> None:
        """Called when the event was handed to the dead-letter store."""

    def after_skip(self, delivery: Delivery, error: BaseException) -> None:
        """Called when an exhausted event was skipped (``on_exhausted="skip"``)."""

    def after_give_up(self, delivery: Delivery, error: BaseException) -> None:
        """Called when an exhausted event stops the bus (``on_exhausted="stop"``, no dead-letter store)."""


def run_before(chain: Sequence[Middleware], delivery: Delivery) -> None:
    """Call each middleware's ``before_delivery``, outermost first; log, never raise, failures.

    :raises Skip: when a middleware skips the delivery (the rest of the chain is not called).
    """
    for mw in chain:
        try:
            mw.before_delivery(delivery)
        except Skip:
            raise
        except Exception:
            log.exception("middleware %r failed in before_delivery; handling goes on", mw)


def run_after(chain: Sequence[Middleware], hook: str, delivery: Delivery, *args: object) -> None:
    """Call each middleware's ``hook`` (``after_delivery`` or ``after_give_up``), innermost
    first, with ``delivery`` and ``args``; log, never raise, failures."""
    for mw in reversed(chain):
        try:
            getattr(mw, hook)(delivery, *args)
        except Exception:
            log.exception("middleware %r failed in %s; handling goes on", mw, hook)
