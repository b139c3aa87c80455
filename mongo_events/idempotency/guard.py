"""How a subscription uses an idempotency store around each attempt.

Claim before the callback, complete after it succeeded, release after it failed:
never mark before success. The claim also counts starts that never finished, which
is how an event that kills the process is recognised after ``max_crashes`` restarts.
A start this process failed to uncount (its release or complete failed) is remembered
here and never counted as a crash by this process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import thread as _futures_thread
from datetime import timedelta
from typing import Any, TypeVar

from ..errors import Duplicate, MongoEventsError, Reject, StoreError
from ..events import ChangeEvent
from .base import ClaimStatus, IdempotencyStore, check_processing_ttl

__all__ = ["ClaimedElsewhere", "CrashCounter", "Idempotency", "PoisonEvent"]

log = logging.getLogger(__name__)

V = TypeVar("V")


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


class _Isolation:
    """A process-wide readers-writer gate: a suspect (an event that was in flight when the
    process died) runs alone, so that a later crash is its own and not a bystander's.

    Without it, events that merely ran beside a poison event would count its crashes too
    and be dead-lettered with it. Suspects go first: new deliveries wait while one waits,
    but a suspect waits at most ``ALONE_WAIT`` seconds for the running callbacks, then runs
    beside them (logged), so a stuck callback never stalls the others for good. Bystanders
    are bounded the same way: a delivery waits at most ``ALONE_WAIT`` for a suspect (and
    nothing waits once a suspect has held the gate alone for ``ALONE_WAIT``), then runs
    beside it (logged at WARNING), so a hung suspect never stalls the process. Nothing
    waits once the interpreter is exiting.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._alone = False
        self._waiting = 0
        #: When the suspect running alone stops holding the others back (monotonic).
        self._alone_until = 0.0
        self._hold_warned = False

    def enter(self, alone: bool) -> bool:
        """Wait for a turn; returns whether it runs alone (pass that to :meth:`leave`)."""
        with self._cond:
            if alone:
                self._waiting += 1
                deadline = time.monotonic() + ALONE_WAIT
                try:
                    while self._alone or self._shared:
                        left = deadline - time.monotonic()
                        if left <= 0 or _exiting():
                            self._shared += 1
                            return False
                        self._cond.wait(min(0.1, left))
                finally:
                    self._waiting -= 1
                    self._cond.notify_all()
                self._alone = True
                self._alone_until = time.monotonic() + ALONE_WAIT
                self._hold_warned = False
                return True
            deadline = time.monotonic() + ALONE_WAIT
            while (self._alone or self._waiting) and not _exiting():
                now = time.monotonic()
                if self._alone and now >= self._alone_until:
                    if not self._hold_warned:
                        self._hold_warned = True
                        log.warning(
                            "a suspect event has run alone for %.0fs (hung?); other deliveries run beside it",
                            ALONE_WAIT,
                        )
                    break
                left = deadline - now
                if left <= 0:
                    log.warning(
                        "a delivery waited %.0fs for a suspect event running alone; it runs beside it",
                        ALONE_WAIT,
                    )
                    break
                self._cond.wait(min(0.1, left))
            self._shared += 1
            return False

    def leave(self, alone: bool) -> None:
        with self._cond:
            if alone:
                self._alone = False
            else:
                self._shared -= 1
            self._cond.notify_all()


#: The clock of claim ages (a name of its own, so tests can move it).
_clock = time.monotonic

#: A suspect waits at most this many seconds for the running callbacks before it runs beside them.
ALONE_WAIT = 30.0

#: One per process: a crash takes every bus of the process with it.
_ISOLATION = _Isolation()

#: At most this many keys are remembered per guard, in each of its tables of unreleased
#: claims and of starts it failed to uncount; beyond it the oldest is forgotten.
_REMEMBERED_KEYS = 10_000


def _remember(table: dict[str, V], key: str, value: V) -> None:
    """Set ``table[key]`` as its newest entry; forget the oldest beyond ``_REMEMBERED_KEYS``.

    Keys that never complete (a dead-lettered event whose last release failed) would
    otherwise stay for the life of the process.
    """
    table.pop(key, None)
    table[key] = value
    while len(table) > _REMEMBERED_KEYS:
        oldest = next(iter(table))
        del table[oldest]
        log.debug(
            "forgot %s (over %d keys remembered): its unreleased starts may count as crashes, "
            "and its retry waits for its claim to expire",
            oldest,
            _REMEMBERED_KEYS,
        )


def _exiting() -> bool:
    """Interpreter shutdown began (the flags the dispatcher's workers watch too)."""
    return bool(getattr(threading, "_SHUTTING_DOWN", False)) or bool(
        getattr(_futures_thread, "_shutdown", False)
    )


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
        A start whose release (or complete) failed in this process is not a crash: the
        process remembers how many such starts each key has and subtracts them from the
        store's count, until the key completes or is removed. The memory is the process's
        own: after a restart, or in another process, those starts count as crashes (a
        blinking store can then dead-letter an event early). At most 10,000 keys are
        remembered; beyond that the oldest is forgotten, with the same consequence.

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
        #: Keys this process still holds because their release failed, with when their
        #: claim was taken (``_clock``): a retry soon after runs under that claim instead of
        #: taking its own claim for someone else's; a later one claims again. Bounded (_remember).
        self._held: dict[str, float] = {}
        #: Per key, how many of the starts the store counts are this process's own that it
        #: failed to uncount (release or complete failed): not crashes. Subtracted from a
        #: fresh claim's count; forgotten when the key completes or is removed. Bounded (_remember).
        self._uncounted: dict[str, int] = {}
        #: Keys whose callback runs now: whether alone (see _Isolation) and when claimed; a
        #: list, in case two deliveries of one key run here at once (a failed claim, fail open).
        self._running: dict[str, list[tuple[bool, float]]] = {}

    def key_for(self, event: ChangeEvent, subscription: str) -> str:
        """The stored key of ``event`` for ``subscription``."""
        return f"{subscription}:{self.key(event) if self.key is not None else event.id}"

    def claim(self, event: ChangeEvent, subscription: str) -> str | None:
        """Claim before the callback; returns the key to :meth:`finish`, or None when unclaimed.

        A key that was in flight when the process died before (its claim counts more than
        one unfinished start, not counting those this process failed to uncount) runs alone
        in this process: its start is uncounted while it waits for the others to finish,
        then counted again, so a crash while it runs is its own, and bystanders never
        inherit a poison event's crashes.

        :raises Duplicate: the key was completed: the delivery is done.
        :raises ClaimedElsewhere: another holder has it: try again later.
        :raises PoisonEvent: it started ``max_crashes`` times without finishing.
        :raises StoreError: the claim failed and ``fail_closed`` is set.
        """
        key = self.key_for(event, subscription)
        with self._lock:
            claimed_at = self._held.pop(key, None)
        _ISOLATION.enter(False)  # while a suspect runs alone, nothing else starts (or counts)
        try:
            # Our unreleased claim still holds for a retry within half its hold; after that it
            # may expire mid-callback (and be taken elsewhere), so the retry claims afresh.
            # Judged after the wait for a turn, which can last ALONE_WAIT: the callback
            # starts now, not when the delivery came.
            now = _clock()
            held = claimed_at is not None and now - claimed_at < self._hold / 2
            if held:  # the retry takes that start over (and finishes it): no longer left counted
                self._count_uncounted(key, -1)
            if claimed_at is None or not held:
                claimed_at = now
            starts = 1 if held else self._take(event, subscription, key)
        except BaseException:
            _ISOLATION.leave(False)
            raise
        if starts is None:  # unguarded (the store failed, fail open)
            _ISOLATION.leave(False)
            return None
        if not self.max_crashes or starts <= 1:
            self._note_running(key, False, claimed_at)
            return key
        # A suspect: give its start back while it waits to run alone, then count it again.
        log.warning("%s was in flight when the process died %d time(s): running it alone", key, starts - 1)
        try:
            self.store.release(key)
        except Exception as exc:
            self._count_uncounted(key, 1)
            log.error(
                "could not uncount the start of %s while it waits (%r); this process does not count it as a crash",
                key,
                exc,
            )
        finally:
            # Keep the shared turn until the start is given back: another suspect (the poison
            # event) could otherwise run alone and kill the process first, and this bystander
            # would keep a crash that was not its own.
            _ISOLATION.leave(False)
        alone = _ISOLATION.enter(True)
        if not alone:
            log.warning(
                "%s could not run alone within %.0fs (callbacks still running); it runs beside them",
                key,
                ALONE_WAIT,
            )
        try:
            claimed_at = _clock()
            again = self._take(event, subscription, key)
        except BaseException:
            _ISOLATION.leave(alone)
            raise
        if again is None:
            _ISOLATION.leave(alone)
            return None
        self._note_running(key, alone, claimed_at)
        return key

    def _note_running(self, key: str, alone: bool, claimed_at: float) -> None:
        with self._lock:
            self._running.setdefault(key, []).append((alone, claimed_at))

    def _take(self, event: ChangeEvent, subscription: str, key: str) -> int | None:
        """One claim: the number of unfinished starts (this one included), or None to run unguarded."""
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
            self._forget_uncounted(key)
            raise Duplicate(key)
        if claim.status is ClaimStatus.BUSY:
            raise ClaimedElsewhere(key, min(1.0, self._hold / 2))
        starts = self._discount(key, claim.starts)
        self._check_crashes(event, subscription, key, starts)
        return starts

    def _discount(self, key: str, starts: int) -> int:
        """A fresh claim's count of unfinished starts, less those this process failed to uncount."""
        if not self._uncounted:  # the hot path: no failed release or complete to remember
            return starts
        with self._lock:
            mine = self._uncounted.get(key)
            if mine is None:
                return starts
            # The store may show fewer (another process completed or removed the key, its
            # record expired, or a release that raised went through): never subtract more
            # than the earlier starts it shows, and remember no more than that.
            mine = max(0, min(mine, starts - 1))
            if mine:
                self._uncounted[key] = mine
            else:
                del self._uncounted[key]
        return starts - mine

    def _count_uncounted(self, key: str, delta: int) -> None:
        """Add ``delta`` to the starts of ``key`` this process failed to uncount."""
        with self._lock:
            n = self._uncounted.get(key, 0) + delta
            if n > 0:
                _remember(self._uncounted, key, n)
            else:
                self._uncounted.pop(key, None)

    def _forget_uncounted(self, key: str) -> None:
        """The store no longer counts the starts of ``key`` (completed or removed)."""
        if self._uncounted:
            with self._lock:
                self._uncounted.pop(key, None)

    def _leave(self, key: str) -> float:
        """The callback of ``key`` ended: give back its turn; returns when it was claimed."""
        with self._lock:
            entries = self._running.get(key)
            if not entries:
                return _clock()
            alone, claimed_at = entries.pop()
            if not entries:
                del self._running[key]
        _ISOLATION.leave(alone)
        return claimed_at

    def _check_crashes(self, event: ChangeEvent, subscription: str, key: str, starts: int) -> None:
        """Raise :class:`PoisonEvent` when ``key`` started ``max_crashes`` times before without finishing."""
        crashes = starts - 1
        if not self.max_crashes or crashes < self.max_crashes:
            return
        with self._lock:
            self.poisoned += 1
        try:
            self.store.remove(key)  # a replay of the dead letter starts counting afresh
        except Exception as exc:
            log.error("could not reset the crash count of %s (%r)", key, exc)
        else:
            self._forget_uncounted(key)
        raise PoisonEvent(
            f"event {event.id} crashed the process {crashes} times for {subscription!r} "
            f"(started {crashes} times without finishing; max_crashes={self.max_crashes})",
            crashes,
        )

    def finish(self, key: str | None, error: BaseException | None) -> None:
        """After the callback: complete on success, release on failure; log and count store errors."""
        if key is None:
            return
        claimed_at = self._leave(key)
        if error is None:
            try:
                self.store.complete(key)
            except Exception as exc:
                with self._lock:
                    self.finish_failures += 1
                self._count_uncounted(key, 1)
                log.error(
                    "the handler succeeded but completing idempotency key %s failed (%r); "
                    "a redelivery after its claim expires would run it again",
                    key,
                    exc,
                )
            else:
                self._forget_uncounted(key)
            return
        try:
            self.store.release(key)
        except Exception as exc:
            with self._lock:
                self.finish_failures += 1
                _remember(self._held, key, claimed_at)
            self._count_uncounted(key, 1)
            log.error(
                "releasing idempotency key %s failed (%r); this process keeps it for its retry "
                "and does not count it as a crash",
                key,
                exc,
            )

    def __repr__(self) -> str:
        return f"<Idempotency {self.store!r} processing_ttl={self.processing_ttl} fail_closed={self.fail_closed}>"


#: How long a crash counter's claim holds by default (``Bus(crash_store=...)`` uses it). A
#: start counts as a crash only once its claim expired unfinished; a live claim makes other
#: consumers of the same event run uncounted. Lower it to count a crash loop faster; a
#: callback running longer than it may count as a crash when another consumer starts the
#: same event after the claim expired.
CRASH_LEASE = timedelta(minutes=1)


class CrashCounter(Idempotency):
    """Counts each (event, subscription) start in a store, to dead-letter poison events, without
    deduplicating: what ``Bus(crash_store=store)`` gives subscriptions without ``idempotency=``.

    Before each call it claims ``"crash:<subscription>:<event id>"`` for ``processing_ttl``
    (one round trip, which counts the start); after it, it removes the key on success or
    releases it on failure (a second round trip). A start counts as a crash only when its
    claim expired unfinished: while another consumer (a replica without a consumer group)
    holds a live claim on the same event, this one runs uncounted. So a crash loop is counted
    at most once per ``processing_ttl``. A store failure never stops the handler: it runs
    uncounted. A start whose release or removal failed is remembered by this process and
    never counted as a crash here; after a restart, or in another process, it is (see
    ``max_crashes`` in :class:`Idempotency`).

    :param processing_ttl: how long a start's claim holds (default :data:`CRASH_LEASE`, read
        when the counter is made).

    .. versionadded:: 0.1.0
    """

    def __init__(
        self, store: IdempotencyStore, *, max_crashes: int = 3, processing_ttl: timedelta | None = None
    ) -> None:
        super().__init__(
            store,
            processing_ttl=CRASH_LEASE if processing_ttl is None else processing_ttl,
            max_crashes=max_crashes,
        )

    def key_for(self, event: ChangeEvent, subscription: str) -> str:
        return f"crash:{subscription}:{event.id}"

    def _take(self, event: ChangeEvent, subscription: str, key: str) -> int | None:
        try:
            claim = self.store.try_claim(key, self.processing_ttl)
        except Exception as exc:
            with self._lock:
                self.claim_failures += 1
            log.error("counting the start of %s failed (%r); the handler runs uncounted", key, exc)
            return None
        if not claim.claimed:  # another consumer's live start: not a crash, run uncounted
            log.debug("%s is running in another consumer; this start runs uncounted", key)
            return None
        starts = self._discount(key, claim.starts)
        self._check_crashes(event, subscription, key, starts)
        return starts

    def finish(self, key: str | None, error: BaseException | None) -> None:
        if key is None:
            return
        self._leave(key)
        try:
            if error is None:
                self.store.remove(key)
            else:
                self.store.release(key)
        except Exception as exc:
            with self._lock:
                self.finish_failures += 1
            self._count_uncounted(key, 1)
            log.error(
                "finishing the start of %s failed (%r); this process does not count it as a crash "
                "(another process, or this one after a restart, may)",
                key,
                exc,
            )
        else:
            if error is None:
                self._forget_uncounted(key)

    def __repr__(self) -> str:
        return f"<CrashCounter {self.store!r} max_crashes={self.max_crashes}>"
