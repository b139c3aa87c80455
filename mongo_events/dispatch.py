"""The dispatcher: worker pool, per-key lanes, retries and the dead-letter hand-off.

Workers are long-running loops submitted to one ``ThreadPoolExecutor``; they
pull ready items from a ``SimpleQueue`` (a sub-microsecond hand-off, cheaper
than one executor task per event). A failed attempt waits in a timer heap, not
on a sleeping worker, so retries never block other documents' lanes. The lane
of a retrying item stays busy, which keeps per-document order.

A finished item goes onto a deque without the lock and is reported (its slot
marked done, its lane's next item released) by whoever holds the lock next:
the worker itself when the lock is free, else the watcher admitting an event, a
flush, another worker, or this worker before its next callback or when idle.
Waiting for a contended lock would cost a thread switch per event.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import thread as _futures_thread
from functools import partial
from typing import Any, Protocol, cast

from .decoding import Decoder
from .delivery import Delivery, _current
from .errors import DecodeError, HandlerFailed, Reject, Retry, Skip
from .events import ChangeEvent
from .idempotency.guard import ClaimedElsewhere
from .middleware.base import Middleware, run_after, run_before
from .subscription import Subscription
from .tracking import Lanes, Slot

__all__ = ["DeadLetterHook", "Dispatcher", "WorkItem"]

log = logging.getLogger(__name__)


class DeadLetterHook(Protocol):
    """Receives an event a subscription gave up on; raising means "not stored, try again later"."""

    def __call__(self, event: ChangeEvent, subscription: str, error: BaseException, attempts: int) -> None: ...


class WorkItem:
    """One event for one subscription."""

    __slots__ = ("attempt", "event", "lane", "slot", "sub", "update_description")

    def __init__(self, sub: Subscription, event: ChangeEvent, slot: Slot, lane: Hashable | None, update_description: Any) -> None:
        self.sub = sub
        self.event = event
        self.slot = slot
        self.lane = lane
        self.attempt = 1
        self.update_description = update_description


#: A worker reports its finished items (taking the lock) once this many wait, or when it
#: runs out of work; meanwhile the watcher, which drains them under the lock on every
#: event it admits, usually reports them first. Per item, that was a lock hand-off each.
_REPORT_AT = 32
_DONE = 0
_RETRY = 1
_ABANDON = 2


class _Lock(Protocol):
    """What the dispatcher needs of its lock (the bus passes the ``RLock`` under its ``Condition``)."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, exc_type: Any, exc: Any, tb: Any, /) -> Any: ...


class Dispatcher:
    """Runs work items on a thread pool, in lane order, with retries."""

    def __init__(
        self,
        *,
        max_workers: int,
        decoder: Decoder,
        middleware: Sequence[Middleware],
        on_done: Callable[[list[Slot]], None],
        on_fatal: Callable[[BaseException], None],
        dead_letters: DeadLetterHook | None,
        bus_name: str,
        lock: _Lock,
    ) -> None:
        """
        :param on_done: called with ``lock`` held with the slots of finished items (done,
            dead-lettered or skipped), in the order they finished, from :meth:`drain`.
        :param lock: the lock guarding lanes and timers; the bus passes the one that
            guards its tracker, so reporting finished items costs one acquisition, and
            every holder calls :meth:`drain`, so finished items are reported by whoever
            holds it next when a worker finds it busy.
        """
        self.max_workers = max_workers
        self._decoder = decoder
        self._middleware = list(middleware)
        self._on_done = on_done
        self._on_fatal = on_fatal
        self._dead_letters = dead_letters
        self._bus_name = bus_name
        self._ready: queue.SimpleQueue[WorkItem | None] = queue.SimpleQueue()  # None wakes a worker
        self._lanes: Lanes[WorkItem] = Lanes()
        self._timers: list[tuple[float, int, WorkItem]] = []
        self._counter = itertools.count()
        self._lock = lock
        #: Finished items not yet reported (appended without the lock; see drain()).
        self._done: deque[WorkItem] = deque()
        self._halt = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        # One flag per worker, set while it runs an attempt: plain list stores, no lock per event.
        self._busy = [False] * max_workers

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        _running.add(self)
        self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="mongo_events.worker")
        for index in range(self.max_workers):
            self._executor.submit(self._work, index)

    def halt(self) -> None:
        """Stop taking new items and cancel pending retries; running callbacks finish."""
        self._halt.set()
        with self._lock:
            self._timers.clear()
        # Wake every worker waiting for an item rather than rely on its get() timeout alone:
        # in a full test run a timed SimpleQueue.get was seen never to return, which left a
        # worker behind and hung interpreter exit in concurrent.futures' join.
        for _ in range(self.max_workers):
            self._ready.put(None)

    def wait_idle(self, deadline: float) -> bool:
        """Wait until no callback is running or ``deadline`` (monotonic) passes."""
        while any(self._busy):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def shutdown(self) -> None:
        _running.discard(self)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- feeding ---------------------------------------------------------------

    def admit(self, item: WorkItem) -> WorkItem | None:
        """Queue ``item`` in its lane (caller holds the lock); returns it when it may run now.

        Pass what it returns to :meth:`enqueue` after releasing the lock.
        """
        if item.lane is None:
            return item
        return self._lanes.push(item.lane, item)

    def enqueue(self, item: WorkItem) -> None:
        """Hand a runnable item (from :meth:`admit`) to the workers."""
        self._ready.put(item)

    # -- workers -----------------------------------------------------------------

    def _next(self) -> WorkItem | None:
        timeout = 0.1
        if self._timers:
            with self._lock:
                if self._timers:
                    due = self._timers[0][0] - time.monotonic()
                    if due <= 0:
                        return heapq.heappop(self._timers)[2]
                    timeout = min(timeout, due)
        try:
            return self._ready.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> None:
        """Report finished items and queue their lanes' successors (caller holds the lock)."""
        done = self._done
        if not done:
            return
        lanes = self._lanes
        put = self._ready.put
        slots = []
        while done:
            item = done.popleft()
            slots.append(item.slot)
            if item.lane is not None:
                successor = lanes.pop_next(item.lane)
                if successor is not None:
                    put(successor)
        self._on_done(slots)  # once per run: the watermark moves once, not once per item

    def _work(self, index: int) -> None:
        busy = self._busy
        lock = self._lock
        done = self._done
        halt = self._halt
        while not halt.is_set():
            item = self._next()
            if item is None:
                if done:  # idle: waiting for the lock costs nothing now
                    with lock:
                        self.drain()
                if _interpreter_exiting():  # checked when idle: three flag reads per event add up
                    return
                continue
            if halt.is_set():
                return
            if len(done) >= _REPORT_AT:  # many unreported items: try before a callback that may be long
                self._try_drain()
            busy[index] = True
            try:
                outcome, delay = self._attempt(item)
            finally:
                busy[index] = False
            if outcome == _RETRY:
                with lock:
                    heapq.heappush(self._timers, (time.monotonic() + delay, next(self._counter), item))
            elif outcome == _DONE:
                # Report it without waiting for the lock: a contended acquisition costs a
                # thread switch per event. If the lock is busy, its holder (the watcher
                # admitting an event, a flush, another worker) reports it on its way out;
                # while more work waits, the worker reports in runs of _REPORT_AT.
                done.append(item)
                if len(done) >= _REPORT_AT or self._ready.empty():
                    self._try_drain()

    def _try_drain(self) -> None:
        """Report finished items if the lock is free right now; never wait for it."""
        lock = self._lock
        if lock.acquire(False):
            try:
                self.drain()
            finally:
                lock.release()

    def _delivery(self, item: WorkItem) -> Delivery:
        return Delivery(
            event=item.event,
            subscription=item.sub.name,
            attempt=item.attempt,
            update_description=item.update_description,
            cluster_time=item.event.cluster_time,
            bus=self._bus_name,
        )

    def _attempt(self, item: WorkItem) -> tuple[int, float]:
        sub = item.sub
        delivery: Delivery | None = None
        error: BaseException | None = None
        if self._middleware or sub.wants_delivery or sub.idempotency is not None:
            delivery = built = self._delivery(item)
            error = call_subscription(sub, item.event, built, self._decoder, self._middleware)
        else:
            # call_subscription without middleware, inlined (this runs once per event): nobody
            # needs the Delivery unless the callback asks current_delivery(), which builds it.
            # sub.callback(argument) is sub.call(...) here: this callback takes no delivery.
            token = _current.set(partial(self._delivery, item))
            try:
                sub.callback(sub.argument(item.event, self._decoder))
            except Exception as exc:
                error = exc
            finally:
                _current.reset(token)
        if error is None or isinstance(error, Skip):  # skipped (or a duplicate): done, not an error
            return _DONE, 0.0
        if isinstance(error, ClaimedElsewhere):  # not an attempt: try again once its holder is done
            log.debug("subscription %r: %s", sub.name, error)
            return _RETRY, error.delay
        if delivery is None:
            delivery = self._delivery(item)
        if isinstance(error, (DecodeError, Reject)) or item.attempt > sub.max_retries:
            return self._give_up(item, delivery, error)
        if isinstance(error, Retry) and error.delay is not None:
            delay = max(0.0, error.delay)
        else:
            delay = sub.retry_backoff.delay(item.attempt)
        log.warning(
            "subscription %r failed on event %s (attempt %d of %d): %r; retrying in %.2fs",
            sub.name, item.event.id, item.attempt, sub.max_retries + 1, error, delay,
        )
        run_after(self._middleware, "after_retry_scheduled", delivery, error, delay)
        item.attempt += 1
        return _RETRY, delay

    def _give_up(self, item: WorkItem, delivery: Delivery, error: BaseException) -> tuple[int, float]:
        sub = item.sub
        attempts = item.attempt
        if self._dead_letters is not None:
            try:
                self._dead_letters(item.event, sub.name, error, attempts)
            except Exception as exc:
                delay = sub.retry_backoff.delay(attempts)
                log.error(
                    "could not dead-letter event %s for %r (%r); it stays undone and is retried in %.2fs",
                    item.event.id, sub.name, exc, delay,
                )
                return _RETRY, delay
            log.error("event %s dead-lettered for %r after %d attempt(s): %r", item.event.id, sub.name, attempts, error)
            run_after(self._middleware, "after_dead_letter", delivery, error)
            return _DONE, 0.0
        if sub.on_exhausted == "skip":
            log.error(
                "event %s skipped by %r after %d attempt(s) (on_exhausted='skip', no dead-letter store): %r",
                item.event.id, sub.name, attempts, error,
            )
            run_after(self._middleware, "after_skip", delivery, error)
            return _DONE, 0.0
        failure = HandlerFailed(
            f"subscription {sub.name!r} gave up on event {item.event.id} after {attempts} attempt(s): {error!r}; "
            "the bus stops and the checkpoint stays before this event, so a restart retries it "
            "(configure dead_letters=... or on_exhausted='skip' to go on instead)",
            subscription=sub.name,
            event_id=item.event.id,
        )
        failure.__cause__ = error
        run_after(self._middleware, "after_give_up", delivery, error)
        self._on_fatal(failure)
        return _ABANDON, 0.0


_running: weakref.WeakSet[Dispatcher] = weakref.WeakSet()


def _interpreter_exiting() -> bool:
    """True once interpreter shutdown began: our hook ran, ``threading`` started shutting
    down, or ``concurrent.futures`` is about to join its workers (private flags, read-only,
    each with a safe default)."""
    return (
        _EXITING.is_set()
        or bool(getattr(threading, "_SHUTTING_DOWN", False))
        or bool(getattr(_futures_thread, "_shutdown", False))
    )


#: Set at interpreter exit: every worker loop ends (after the callback it is running, if any).
#: The loops also watch ``concurrent.futures.thread._shutdown``, which that module sets just
#: before it joins its workers, in case this hook has not run.
_EXITING = threading.Event()


def _halt_at_exit() -> None:
    """At interpreter exit concurrent.futures joins its worker threads: a bus that was never
    stopped must not keep its workers looping, or exit would hang. Its unfinished events
    are simply delivered again after restart."""
    _EXITING.set()
    for dispatcher in list(_running):
        if not dispatcher._halt.is_set():
            log.warning("interpreter exiting while bus %s still runs; call stop() for a final checkpoint", dispatcher._bus_name)
            dispatcher.halt()


# Registered after concurrent.futures' own hook, so it runs before that hook joins the workers
# (threading runs these in reverse order, before joining non-daemon threads).
_register_atexit = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(_halt_at_exit)


def call_subscription(
    sub: Subscription,
    event: ChangeEvent,
    delivery: Delivery | Callable[[], Delivery],
    decoder: Decoder,
    chain: Sequence[Middleware],
) -> BaseException | None:
    """One attempt: middleware, idempotency claim, decode, callback. Returns the exception, if any:
    a ``Skip`` (or ``Duplicate``) when the delivery is done without the callback, a
    ``ClaimedElsewhere`` when another holder has its idempotency key (not an attempt).

    ``delivery`` may be a function that builds it, only when ``chain`` is empty and the
    callback does not take a delivery: then only ``current_delivery()`` builds it.
    """
    token = _current.set(delivery)
    built = cast(Delivery, delivery)  # a Delivery whenever chain is not empty or the callback takes one
    error: BaseException | None = None
    start = time.perf_counter() if chain else 0.0
    guard = sub.idempotency
    try:
        try:
            if chain:
                run_before(chain, built)
            # Claimed after the chain's before-hooks (the monitor sees duplicates), before the callback.
            held = guard.claim(event, sub.name) if guard is not None else None
        except Skip as skip:
            if chain:
                run_after(chain, "after_delivery_skipped", built, skip)
            return skip
        except ClaimedElsewhere as busy:
            return busy  # not an attempt: no after-hook; before_delivery runs again next time
        except Exception as exc:  # the claim failed (fail_closed) or found a poison event
            error = exc
        else:
            try:
                sub.call(sub.argument(event, decoder), built)
            except Exception as exc:
                error = exc
            except BaseException as exc:  # SystemExit, KeyboardInterrupt: give the claim back first
                if guard is not None:
                    guard.finish(held, exc)
                raise
            if guard is not None:
                guard.finish(held, error)
        if chain:
            run_after(chain, "after_delivery", built, error, time.perf_counter() - start)
    finally:
        _current.reset(token)
    return error
