"""The idempotency-store contract: claim, then complete or release."""

from __future__ import annotations

import abc
import enum
from datetime import timedelta

import attrs

__all__ = ["Claim", "ClaimStatus", "IdempotencyStore"]


class ClaimStatus(str, enum.Enum):
    """What :meth:`IdempotencyStore.try_claim` found.

    .. versionadded:: 0.1.0
    """

    #: The caller now holds the key: run the handler, then complete or release it.
    CLAIMED = "claimed"
    #: The key was processed (completed and not expired): a duplicate.
    COMPLETED = "completed"
    #: Someone else holds an unexpired claim on the key: try again later.
    BUSY = "busy"


@attrs.frozen
class Claim:
    """The outcome of one claim.

    :ivar status: claimed, completed (a duplicate) or busy (claimed elsewhere).
    :ivar starts: how many claims of this key started and never finished (neither
        completed nor released), this one included when ``status`` is ``CLAIMED``.
        A number above 1 means earlier holders died while handling it.

    .. versionadded:: 0.1.0
    """

    status: ClaimStatus
    starts: int = 0

    @property
    def claimed(self) -> bool:
        return self.status is ClaimStatus.CLAIMED


class IdempotencyStore(abc.ABC):
    """Remembers which keys were processed, so a redelivered event's effect happens once.

    The protocol is claim, then complete or release:

    - :meth:`claim` (atomic) takes the key for ``processing_ttl``; it is false when the
      key is completed, or claimed by someone else and that claim has not expired;
    - :meth:`complete` after the handler succeeded: the key counts as processed for ``ttl``;
    - :meth:`release` after the handler failed: the redelivery (or retry) runs again.

    So a failed handler never marks its event processed, and two processes handling
    the same event at once run it once. Every method raises
    :class:`mongo_events.StoreError` when the backend fails.

    :param ttl: how long a completed key is remembered.

    .. versionadded:: 0.1.0
    """

    def __init__(self, ttl: timedelta) -> None:
        if not isinstance(ttl, timedelta) or ttl <= timedelta(0):
            raise ValueError(f"ttl must be a positive datetime.timedelta, got {ttl!r}")
        self.ttl = ttl

    def claim(self, key: str, processing_ttl: timedelta) -> bool:
        """Take ``key`` for ``processing_ttl``; False when it is completed or held elsewhere."""
        return self.try_claim(key, processing_ttl).claimed

    @abc.abstractmethod
    def try_claim(self, key: str, processing_ttl: timedelta) -> Claim:
        """Like :meth:`claim`, in one round trip, but says why it failed and counts unfinished starts."""

    @abc.abstractmethod
    def complete(self, key: str) -> None:
        """Mark ``key`` processed until ``ttl`` from now (whoever holds it)."""

    @abc.abstractmethod
    def release(self, key: str) -> None:
        """Give back this store's claim on ``key`` after a failure (no-op if another holds it now)."""

    @abc.abstractmethod
    def remove(self, key: str) -> None:
        """Forget ``key`` entirely, its count of unfinished starts included."""

    def ensure_indexes(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Create the indexes the store needs (called by ``Bus.start()``)."""

    def close(self) -> None:  # noqa: B027
        """Release resources."""


def check_processing_ttl(processing_ttl: timedelta) -> float:
    """``processing_ttl`` in seconds, or ValueError."""
    if not isinstance(processing_ttl, timedelta) or processing_ttl <= timedelta(0):
        raise ValueError(f"processing_ttl must be a positive datetime.timedelta, got {processing_ttl!r}")
    return processing_ttl.total_seconds()
