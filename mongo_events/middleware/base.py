"""The middleware base class and how a chain of them is run."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..delivery import Delivery

__all__ = ["Middleware", "run_after", "run_before"]

log = logging.getLogger(__name__)


class Middleware:
    """Override any hook. ``before_*`` hooks run in order, ``after_*`` hooks in reverse.

    A hook that raises is logged and skipped: a broken middleware never stops
    event handling.

    .. versionadded:: 0.1.0
    """

    def before_delivery(self, delivery: Delivery) -> None:
        """Called on the worker thread before each attempt."""

    def after_delivery(self, delivery: Delivery, error: BaseException | None, duration: float) -> None:
        """Called after each attempt with the callback's exception (or ``None``) and its duration in seconds."""

    def after_retry_scheduled(self, delivery: Delivery, error: BaseException, delay: float) -> None:
        """Called when a failed attempt will be retried after ``delay`` seconds."""

    def after_dead_letter(self, delivery: Delivery, error: BaseException) -> None:
        """Called when the event was handed to the dead-letter store."""

    def after_skip(self, delivery: Delivery, error: BaseException) -> None:
        """Called when an exhausted event was skipped (``on_exhausted="skip"``)."""

    def after_give_up(self, delivery: Delivery, error: BaseException) -> None:
        """Called when an exhausted event stops the bus (``on_exhausted="stop"``, no dead-letter store)."""


def run_before(chain: Sequence[Middleware], delivery: Delivery) -> None:
    """Call each middleware's ``before_delivery``, outermost first; log, never raise, failures."""
    for mw in chain:
        try:
            mw.before_delivery(delivery)
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
