"""The guard every thread a bus owns runs under: a thread never dies silently.

The watcher, each worker and the flusher run their loop through :func:`run_guarded`.
Any exception that escapes the loop, ``BaseException`` included (a callback's
``SystemExit`` or ``KeyboardInterrupt``, an exception whose ``repr()`` raises, a
library bug), becomes a :class:`~mongo_events.errors.ThreadFailed` handed to the
bus, which fails: state ``FAILED``, ``bus.error`` set, health ``unhealthy``, one
ERROR log line, and ``run_forever()`` / ``join()`` return or raise. A dead thread
under a ``RUNNING`` bus would stop delivery while everything looks healthy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .errors import ThreadFailed

__all__ = ["describe", "run_guarded"]

log = logging.getLogger(__name__)


def describe(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, even when its ``str()`` or ``repr()`` raises."""
    name = type(exc).__name__
    try:
        text = str(exc)
    except BaseException:  # a broken __str__ must not hide the failure
        return f"{name} (its message could not be rendered)"
    return f"{name}: {text}" if text else name


def run_guarded(loop: Callable[[], None], on_fatal: Callable[[BaseException], None], thread: str) -> None:
    """Run ``loop``; if anything escapes it, fail the bus through ``on_fatal`` instead of dying silently."""
    try:
        loop()
    except BaseException as exc:  # that is the point: nothing escapes unreported
        if isinstance(exc, ThreadFailed):
            error = exc
        else:
            error = ThreadFailed(
                f"thread {thread} died from {describe(exc)}; the bus stops (unfinished events are "
                "delivered again after restart)",
                thread=thread,
            )
            error.__cause__ = exc
        try:
            on_fatal(error)
        except BaseException:  # last resort: at least say it
            log.critical("thread %s died and could not fail its bus", thread, exc_info=True)
