"""Exceptions raised by mongo-events: one root, branches by what the caller can do."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "BusStateError",
    "ConfigurationError",
    "DecodeError",
    "Duplicate",
    "HandlerFailed",
    "MongoEventsError",
    "Reject",
    "ResumeTokenLost",
    "Retry",
    "ShutdownTimeout",
    "Skip",
    "StoreError",
    "StreamError",
    "ThreadFailed",
]


class MongoEventsError(Exception):
    """Root of every exception this library raises."""


class ConfigurationError(MongoEventsError, ValueError):
    """The bus or a subscription was configured wrongly; the message says how to fix it."""


class BusStateError(MongoEventsError, RuntimeError):
    """The operation does not fit the bus's state (for example ``start()`` twice, or use after fork)."""


class StreamError(MongoEventsError):
    """The change stream failed in a way the watcher cannot recover from by itself."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ResumeTokenLost(StreamError):
    """The stored resume point is no longer usable (history lost or token invalid).

    :ivar key: the resume-token key.
    :ivar since: cluster time of the last checkpoint, when known.
    """

    def __init__(self, message: str, *, key: str | None = None, since: Any = None) -> None:
        super().__init__(message, key=key)
        self.since = since


class DecodeError(MongoEventsError):
    """A change document could not be structured into the subscription's payload type.

    :ivar errors: readable paths of what failed, such as ``$.items[0].qty``.
    :ivar raw: the document that failed to decode.
    """

    def __init__(self, message: str, *, errors: list[str] | None = None, raw: Any = None) -> None:
        super().__init__(message)
        self.errors = errors or []
        self.raw = raw


class StoreError(MongoEventsError):
    """A store could not be read or written."""


class HandlerFailed(MongoEventsError):
    """A subscription ran out of retries with no dead-letter store and ``on_exhausted="stop"``.

    :ivar subscription: the subscription's name.
    :ivar event_id: the id of the change event that failed.
    """

    def __init__(self, message: str, *, subscription: str, event_id: str) -> None:
        super().__init__(message)
        self.subscription = subscription
        self.event_id = event_id


class ThreadFailed(MongoEventsError):
    """A thread the bus owns (watcher, worker, flusher) died from an unexpected exception, so the bus failed.

    The cause (``__cause__``) is the exception, for instance a callback's ``SystemExit``.

    :ivar thread: the thread's name.

    .. versionadded:: 0.1.0
    """

    def __init__(self, message: str, *, thread: str) -> None:
        super().__init__(message)
        self.thread = thread


class ShutdownTimeout(MongoEventsError, TimeoutError):
    """``stop()`` stopped waiting with callbacks still running; they will be redelivered.

    :ivar running: each callback still running (subscription, event id, thread); empty when
        the raiser did not say.
    :ivar waited: seconds the stop waited for them (a consumer-group member waits less than
        ``stop()``'s timeout: see the message), or ``None`` when the raiser did not say.
    """

    def __init__(self, message: str, *, running: Sequence[str] = (), waited: float | None = None) -> None:
        super().__init__(message)
        self.running = tuple(running)
        self.waited = waited


class Retry(MongoEventsError):
    """Raise from a callback to retry the event after ``delay`` seconds (counts as an attempt)."""

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        super().__init__(reason or f"retry requested (delay={delay})")
        self.delay = delay


class Reject(MongoEventsError):
    """Raise from a callback to dead-letter the event now, without more retries."""

    def __init__(self, reason: str = "rejected by the handler") -> None:
        super().__init__(reason)
        self.reason = reason


class Skip(MongoEventsError):
    """Raise from a middleware's ``before_delivery`` to finish the delivery without calling the callback.

    A skipped delivery is done: not an error, not retried, not dead-lettered. The
    middleware chain hears of it through ``after_delivery_skipped``.

    .. versionadded:: 0.1.0
    """

    def __init__(self, reason: str = "skipped by middleware") -> None:
        super().__init__(reason)
        self.reason = reason


class Duplicate(Skip):
    """The delivery was skipped because its idempotency key was already processed.

    :ivar key: the idempotency key, as stored.

    .. versionadded:: 0.1.0
    """

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate: {key} was already processed")
        self.key = key
