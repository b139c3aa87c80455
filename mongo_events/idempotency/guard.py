"""How a subscription uses an idempotency store around each attempt.

Claim before the callback, complete after it succeeded, release after it failed:
never mark before success. The claim also counts starts that never finished, which
is how an event that kills the process is recognised after ``max_crashes`` restarts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ..errors import Duplicate, MongoEventsError, Reject, StoreError
from ..events import ChangeEvent
from .base import ClaimStatus, IdempotencyStore, check_processing_ttl

__all__ = ["ClaimedElsewhere", "Idempotency", "PoisonEvent"]

log = logging.getLogger(__name__)


class PoisonEvent(Reject):
    """An event started ``max_crashes`` times without ever finishing: it keeps killing the process.

    It goes to the dead letters (no more attempts) so that the stream moves on.

    :ivar crashes: how many times it started and did not finish.

    .. versionadded:: 0.1.0
    """

    def __init__(self, reason: str, crashes: int) -> None:
        super().__init__(reason)
        self.crashes = crashes


class ClaimedElsewhere(MongoEventsError):
    """Another process (or an earlier life of this one) holds the key: try again after ``delay``.

    Not an attempt: the dispatcher reschedules the delivery without counting it.
    """

    def __init__(self, key: str, delay: float) -> None:
        super().__init__(f"{key} is being handled elsewhere; trying again in {delay:.2f}s")
        self.key = key
        self.delay = delay


class Idempotency:
    """An idempotency store and how to use it: pass as ``idempotency=`` to ``Bus`` or ``subscribe``.

    Passing a store alone is the same as ``Idempotency(store)``.

    :param store: where keys are claimed and completed.
    :param key: ``fn(event) -> str``, a business key (default: the event id); the
        stored key is ``"<subscription>:<key>"`` either way.
    :param processing_ttl: how long a claim holds. A handler running longer than this may
        run a second time elsewhere; a process that died holding a claim delays that
        event's redelivery by up to this long.
    :param fail_closed: when a claim fails (the store is down), treat it as a failed
        attempt (retried, then dead-lettered) instead of running the handler unguarded
        (the default, "fail open"). Either way the failure is logged and counted.
    :param max_crashes: an event whose claim started this many times without finishing
        (the process died each time) is dead-lettered with
        ``"crashed the process N times"`` instead of being run again. ``0`` turns this off.

    :ivar duplicates: deliveries skipped because their key was completed.
    :ivar claim_failures: claims that failed (store errors).
    :ivar finish_failures: completes and releases that failed.
    :ivar poisoned: events dead-lettered for crashing the process.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        store: IdempotencyStore,
        *,
        key: Callable[[ChangeEvent], Any] | None = None,
        processing_ttl: timedelta = timedelta(minutes=1),
        fail_closed: bool = False,
        max_crashes: int = 3,
    ) -> None:
        if not isinstance(store, IdempotencyStore):
            raise TypeError(f"Idempotency needs an IdempotencyStore, got {type(store).__name__}")
        if key is not None and not callable(key):
            raise TypeError(f"key must be a function of the event, got {key!r}")
        self._hold = check_processing_ttl(processing_ttl)
        if max_crashes < 0:
            raise ValueError(f"max_crashes must be >= 0, got {max_crashes}")
        self.store = store
        self.key = key
        self.processing_ttl = processing_ttl
        self.fail_closed = fail_closed
        self.max_crashes = max_crashes
        self.duplicates = 0
        self.claim_failures = 0
        self.finish_failures = 0
        self.poisoned = 0
        self._lock = threading.Lock()
        #: Keys this process still holds because their release failed: a retry must not
        #: take its own claim for someone else's.
        self._held: set[str] = set()

    def key_for(self, event: ChangeEvent, subscription: str) -> str:
        """The stored key of ``event`` for ``subscription``."""
        return f"{subscription}:{self.key(event) if self.key is not None else event.id}"

    def claim(self, event: ChangeEvent, subscription: str) -> str | None:
        """Claim before the callback; returns the key to :meth:`finish`, or None when unclaimed.

        :raises Duplicate: the key was completed: the delivery is done.
        :raises ClaimedElsewhere: another holder has it: try again later.
        :raises PoisonEvent: it started ``max_crashes`` times without finishing.
        :raises StoreError: the claim failed and ``fail_closed`` is set.
        """
        key = self.key_for(event, subscription)
        with self._lock:
            if key in self._held:
                self._held.discard(key)
                return key
        try:
            claim = self.store.try_claim(key, self.processing_ttl)
        except Exception as exc:
            with self._lock:
                self.claim_failures += 1
            if self.fail_closed:
                log.error(
                    "idempotency claim of %s failed (%r); fail_closed: the attempt counts as failed and is retried",
                    key,
                    exc,
                )
                raise StoreError(f"could not claim idempotency key {key!r}: {exc}") from exc
            log.error(
                "idempotency claim of %s failed (%r); failing open: the handler runs unguarded (it may run twice)",
                key,
                exc,
            )
            return None
        if claim.status is ClaimStatus.COMPLETED:
            with self._lock:
                self.duplicates += 1
            log.debug("event %s for %r is a duplicate (%s completed)", event.id, subscription, key)
            raise Duplicate(key)
        if claim.status is ClaimStatus.BUSY:
            raise ClaimedElsewhere(key, min(1.0, self._hold / 2))
        crashes = claim.starts - 1
        if self.max_crashes and crashes >= self.max_crashes:
            with self._lock:
                self.poisoned += 1
            try:
                self.store.remove(key)  # a replay of the dead letter starts counting afresh
            except Exception as exc:
                log.error("could not reset the crash count of %s (%r)", key, exc)
            raise PoisonEvent(
                f"event {event.id} crashed the process {crashes} times for {subscription!r} "
                f"(started {crashes} times without finishing; max_crashes={self.max_crashes})",
                crashes,
            )
        return key

    def finish(self, key: str | None, error: BaseException | None) -> None:
        """After the callback: complete on success, release on failure; log and count store errors."""
        if key is None:
            return
        if error is None:
            try:
                self.store.complete(key)
            except Exception as exc:
                with self._lock:
                    self.finish_failures += 1
                log.error(
                    "the handler succeeded but completing idempotency key %s failed (%r); "
                    "a redelivery after its claim expires would run it again",
                    key,
                    exc,
                )
            return
        try:
            self.store.release(key)
        except Exception as exc:
            with self._lock:
                self.finish_failures += 1
                self._held.add(key)
            log.error(
                "releasing idempotency key %s failed (%r); this process keeps it for its retry", key, exc
            )

    def __repr__(self) -> str:
        return f"<Idempotency {self.store!r} processing_ttl={self.processing_ttl} fail_closed={self.fail_closed}>"
