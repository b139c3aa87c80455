"""The dispatcher: worker pool, per-key lanes, retries and the dead-letter hand-off.

Workers are long-running loops submitted to one ``ThreadPoolExecutor`` per bus;
they pull ready items from a ``SimpleQueue`` (a sub-microsecond hand-off,
cheaper than one executor task per event). Each loop runs under the guard
(:mod:`mongo_events.guard`): a worker that dies fails the bus. A failed attempt
waits in a timer heap, not on a sleeping worker, so retries never block other
documents' lanes. The lane of a retrying item stays busy, which keeps
per-document order.

With several subscriptions, an event whose document has nothing else in flight is one
:class:`FanOut`: one hand-off, one lane, the subscriptions run in turn (idle workers take
the parts not started yet). Behind a part still running or retrying, that subscription's
later events of the document wait in a lane of their own, ``(subscription index,
document)``, so order, retries and dead letters stay per subscription (see
:meth:`Dispatcher.fan_out`). Per subscription, an item and a hand-off cost more than its
no-op callback.

With ``Bus(coalesce=True)`` the lanes are :class:`CoalescingLanes`: a newer event of a
document replaces the one waiting in its lane, and takes over its slot, which is
reported done only when the newer event is (see the class for the rules).

A finished item goes onto a deque without the lock and is reported (its slot
marked done, its lane's next item released) by whoever holds the lock next:
the worker itself when the lock is free, else the watcher admitting an event, a
flush, another worker, or this worker before its next callback or when idle.
Waiting for a contended lock would cost a thread switch per event.

Shutdown (the one mechanism, documented here)
---------------------------------------------
``stop()`` ends the workers: :meth:`Dispatcher.halt` sets the halt flag and puts
one wake-up per worker on the ready queue, so idle loops return at once; busy
ones return when their callback does, and ``stop()`` waits for them only until
its deadline. The process exit never waits for a worker: the executor's threads
are daemon threads and are left out of concurrent.futures' exit-time join (see
:func:`_start_daemon_workers`).

Why a blocked callback used to hang the exit: ``ThreadPoolExecutor`` threads are
non-daemon, and concurrent.futures registers a ``threading`` exit hook that joins
every executor thread. ``threading``'s exit hooks and its join of non-daemon
threads run *before* ``atexit`` hooks, and our loops only return once halted, so
the interpreter waited forever in that join: for an idle loop nobody halted (no
``stop()``), or for a callback that never returns (after ``stop()`` gave up on
it). An ``atexit`` hook that halted the loops, and an "exiting" flag the idle loops
checked, ran too late to help; they are gone. What remains at exit is a warning
only (:func:`_warn_at_exit`): a bus that was never stopped writes no final
checkpoint, so its unfinished events are delivered again after restart.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread
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
from functools import partial
from operator import length_hint
from typing import Any, Protocol, cast

import attrs

from .decoding import Decoder
from .delivery import Delivery, _current
from .errors import ConfigurationError, DecodeError, HandlerFailed, Reject, Retry, Skip, ThreadFailed
from .events import ChangeEvent
from .guard import describe, run_guarded
from .idempotency.guard import ClaimedElsewhere
from .middleware.base import Middleware, run_after, run_before
from .options import invalid
from .subscription import Subscription
from .tracking import Lanes, Slot

__all__ = [
    "STREAM_LANE",
    "Abandoned",
    "CoalescingLanes",
    "DeadLetterHook",
    "Dispatcher",
    "FanOut",
    "WorkItem",
    "check_coalesce",
]

log = logging.getLogger(__name__)

#: The key of every event's lanes under ``ordering="stream"`` (see :meth:`Dispatcher.fan_out`).
STREAM_LANE = "mongo_events.stream"


class DeadLetterHook(Protocol):
    """Receives an event a subscription gave up on; raising means "not stored, try again later"."""

    def __call__(
        self, event: ChangeEvent, subscription: str, error: BaseException, attempts: int
    ) -> None: ...


class WorkItem:
    """One event for one subscription."""

    __slots__ = (
        "attempt",
        "covered",
        "dead_letter_tries",
        "event",
        "failure",
        "lane",
        "parent",
        "slot",
        "solo",
        "sub",
        "update_description",
    )

    def __init__(
        self,
        sub: Subscription,
        event: ChangeEvent,
        slot: Slot,
        lane: Hashable | None,
        update_description: Any,
    ) -> None:
        self.sub = sub
        self.event = event
        self.slot = slot
        self.lane = lane
        self.attempt = 1
        self.update_description = update_description
        #: Set when the subscription gave up but the dead-letter write failed: only the write is retried.
        self.failure: BaseException | None = None
        self.dead_letter_tries = 0
        #: Slots of the waiting events this item replaced (``coalesce=True``): they are
        #: reported done with this item's own slot, never before.
        self.covered: list[Slot] | None = None
        #: The fan-out this is one subscription's part of (a retry, a dead-letter write): it is
        #: reported as that part, not through a lane of its own.
        self.parent: FanOut | None = None
        #: In a per-subscription lane ``(subscription index, key)`` of a bus with several
        #: subscriptions (see :meth:`Dispatcher.fan_out`): its lane's end is counted there.
        self.solo = False


class FanOut:
    """One event for several subscriptions, run in turn by one worker (or a few, see ``claims``).

    Per subscription it is what a :class:`WorkItem` would be: each part is attempted,
    retried (as a ``WorkItem`` whose ``parent`` is this), dead-lettered and reported on
    its own; only the queue hand-off, the lane and the item are shared. Its ``key`` (a
    document, or the stream under ``ordering="stream"``) has no other work in flight
    when it is made, so each part is its subscription's next event of that key.
    """

    __slots__ = (
        "claims",
        "event",
        "finished",
        "key",
        "offered",
        "seen",
        "slot",
        "subs",
        "update_description",
        "watched",
    )

    def __init__(
        self,
        subs: Sequence[Subscription],
        event: ChangeEvent,
        slot: Slot,
        key: Hashable | None,
        update_description: Any,
    ) -> None:
        self.subs = subs
        self.event = event
        self.slot = slot
        self.key = key
        self.update_description = update_description
        #: Hands out each subscription once: ``next()`` on a list iterator is atomic under the
        #: GIL, so the worker running it and idle workers helping it never take the same one.
        self.claims = iter(subs)
        #: Subscriptions done with it (appended by workers without the lock) ...
        self.finished: list[Subscription] = []
        #: ... of which the first ``seen`` were reported (under the lock).
        self.seen = 0
        #: A later event of ``key`` waits behind one of its parts: report each part at once.
        self.watched = False
        #: It sits on the ready queue for an idle worker to help (a hint; a race only costs a no-op).
        self.offered = False


#: A worker reports its finished items (taking the lock) once this many wait, or when it
#: runs out of work; meanwhile the watcher, which drains them under the lock on every
#: event it admits, usually reports them first. Per item, that was a lock hand-off each.
_REPORT_AT = 32
#: How often a worker holding an item re-checks a closed gate (a consumer group's lease).
GATE_PAUSE = 0.05
_DONE = 0
_RETRY = 1
_ABANDON = 2


class _Lock(Protocol):
    """What the dispatcher needs of its lock (the bus passes the ``RLock`` under its ``Condition``)."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, exc_type: Any, exc: Any, tb: Any, /) -> Any: ...


class CoalescingLanes(Lanes[WorkItem]):
    """Per-document lanes where a newer event replaces the one waiting (``Bus(coalesce=True)``).

    Go's ``CoalesceByDocumentKey``: while a lane's item runs, the events of its document
    that arrive meanwhile are a backlog, and only the newest of it is delivered. The rules:

    - Only the *waiting* item is replaced, never the lane's active one: an item that runs,
      or sits in the timer heap for a retry or a dead-letter write, is carried to its end.
    - Both items need a document key and the same subscription. A lane is one document of
      one subscription, so this holds by construction; it is checked anyway. Events without
      a document key (drop, rename, invalidate, DDL) never replace and are never replaced.
    - The newer item takes over the older one's slot, and the slots the older one had taken
      over: they are reported done with its own slot, when it is done (returned, skipped,
      dead-lettered), never before. So the watermark never passes a replaced event before
      its replacement finished; if the bus stops or crashes first, the checkpoint stays
      before the replaced event, and a restart delivers it (or a newer one) again.

    So a bus's document lane holds at most one waiting item. Replaced events still count
    in ``max_in_flight`` until their replacement is done.

    :param on_coalesced: ``fn(replaced)`` called (with the lock held) for each replaced item.
    """

    def __init__(self, on_coalesced: Callable[[WorkItem], None] | None = None) -> None:
        super().__init__()
        self._on_coalesced = on_coalesced
        #: Items replaced since start (read under the lock, or as a plain int anywhere).
        self.coalesced = 0

    def push(self, key: Hashable, item: WorkItem) -> WorkItem | None:
        queue = self._waiting.get(key)
        if queue and item.event.document_key:
            older = queue[-1]
            if older.sub is item.sub and older.event.document_key:
                queue[-1] = item
                covered = older.covered
                if covered is None:
                    item.covered = [older.slot]
                else:
                    covered.append(older.slot)
                    item.covered = covered
                self.coalesced += 1
                if self._on_coalesced is not None:
                    self._on_coalesced(older)
                return None
        return super().push(key, item)


def check_coalesce(coalesce: object, ordering: object) -> None:
    """``Bus(coalesce=...)`` must be a bool, and ``True`` only with ``ordering="document"``.

    :raises ConfigurationError: naming the option (and ``ordering``) when not.
    """
    if type(coalesce) is not bool:
        raise invalid("coalesce", coalesce, "True or False")
    if not coalesce or ordering == "document":
        return
    if ordering == "none":
        why = (
            "ordering='none' runs a document's events in parallel, so no backlog ever waits behind "
            "one of them to be coalesced"
        )
    else:
        why = (
            f"ordering={ordering!r} promises stream order across documents, and skipping one "
            "document's intermediate events would show callbacks combinations of documents that never existed"
        )
    raise ConfigurationError(
        f"coalesce=True cannot be combined with ordering={ordering!r}: {why}. Coalescing needs "
        "ordering='document' (the default); or drop coalesce=True"
    )


@attrs.frozen
class Abandoned:
    """Callbacks still running when a stop, or a partition's revocation, stopped waiting for them:
    their events are not checkpointed, so they are delivered again, maybe while these still run.

    :ivar running: :meth:`Dispatcher.running` at that moment (subscription, event id, thread).
    :ivar at: that moment (monotonic).
    """

    running: tuple[str, ...]
    at: float


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
        executor: ThreadPoolExecutor | None = None,
        gate: Callable[[], bool] | None = None,
    ) -> None:
        """
        :param on_done: called with ``lock`` held with the slots of finished items (done,
            dead-lettered or skipped), in the order they finished, from :meth:`drain`.
        :param lock: the lock guarding lanes and timers; the bus passes the one that
            guards its tracker, so reporting finished items costs one acquisition, and
            every holder calls :meth:`drain`, so finished items are reported by whoever
            holds it next when a worker finds it busy.
        :param executor: a pool shared with other dispatchers (a consumer group's partitions);
            it needs a free thread per worker and is not shut down here. Default: its own.
        :param gate: checked before each item; while False the worker holds the item, and
            runs it if the gate opens again (a late lease renewal) or drops it undone once
            the dispatcher is halted (the partition was given up): a partition whose lease
            is overdue delivers nothing, and one renewed late neither skips nor stalls.
        """
        self.max_workers = max_workers
        self._decoder = decoder
        self._middleware = list(middleware)
        self._on_done = on_done
        self._on_fatal = on_fatal
        self._dead_letters = dead_letters
        self._bus_name = bus_name
        self._ready: queue.SimpleQueue[WorkItem | FanOut | None] = queue.SimpleQueue()  # None wakes a worker
        #: Per-key lanes (guarded by ``lock``). Public for the stream consumer's hot path,
        #: which pushes a single subscription's item here without :meth:`admit`'s extra call.
        self.lanes: Lanes[WorkItem] = Lanes()
        self._timers: list[tuple[float, int, WorkItem]] = []
        self._counter = itertools.count()
        self._lock = lock
        #: Finished items not yet reported (appended without the lock; see drain()). Read-only
        #: outside: a lock holder tests it before calling drain(), as drain() itself does.
        self.finished: deque[WorkItem | FanOut] = deque()
        self._halt = threading.Event()
        self._halting = False  # set with _halt: a worker reads it per item without a call
        self._threads: list[threading.Thread] = []
        self._executor: ThreadPoolExecutor | None = executor
        self._owns_executor = executor is None
        self._gate = gate
        # Per worker, the item whose attempt it runs (else None): plain list stores, no lock per event.
        self._busy: list[WorkItem | FanOut | None] = [None] * max_workers
        # Per worker running a fan-out, the subscription it runs (for running()).
        self._busy_sub: list[Subscription | None] = [None] * max_workers
        #: Fan-outs with a part not yet reported, by key (guarded by ``lock``).
        self._fanouts: dict[Hashable, FanOut] = {}
        #: Set at the first fan-out: only then may an idle worker find one to help with.
        self._fanning = False
        #: Per key, how many per-subscription lanes ``(index, key)`` are open (guarded by ``lock``):
        #: while any is, that key's events go to those lanes, one item per subscription.
        self._solo: dict[Hashable, int] = {}

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        _running.add(self)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self.max_workers, thread_name_prefix=f"mongo_events.worker[{self._bus_name}]"
            )
        loops = [
            partial(
                run_guarded,
                partial(self._work, index),
                self._on_fatal,
                f"mongo_events.worker[{self._bus_name}] {index}",
            )
            for index in range(self.max_workers)
        ]
        self._threads = _start_daemon_workers(self._executor, loops)

    def halt(self) -> None:
        """Stop taking new items and cancel pending retries; running callbacks finish."""
        self._halting = True
        self._halt.set()
        with self._lock:
            self._timers.clear()
        # Wake every worker waiting for an item rather than rely on its get() timeout alone.
        for _ in range(self.max_workers):
            self._ready.put(None)
        if self._executor is not None and self._owns_executor:
            self._executor.shutdown(wait=False)  # each thread ends once its loop returns

    def wait_idle(self, deadline: float, hurry: threading.Event | None = None) -> bool:
        """Wait until no callback is running, ``deadline`` (monotonic) passes or ``hurry`` is set.

        It polls: a notification when a worker becomes idle would cost every event, and only a
        stop waits here."""
        while any(self._busy):
            if time.monotonic() >= deadline or (hurry is not None and hurry.is_set()):
                return False
            time.sleep(0.005)
        return True

    def running(self) -> list[str]:
        """What the workers still run: ``"subscription 'x' on event <id> (thread)"`` per busy worker."""
        out = []
        for index, item in enumerate(list(self._busy)):
            if item is not None:
                sub = item.sub if type(item) is WorkItem else self._busy_sub[index]
                name = sub.name if sub is not None else "?"
                thread = self._threads[index].name if index < len(self._threads) else f"worker {index}"
                out.append(f"subscription {name!r} on event {item.event.id} ({thread})")
        return out

    def abandoned(self) -> Abandoned | None:
        """The callbacks running now, as given up on now (``None`` when none is running)."""
        running = self.running()
        return Abandoned(tuple(running), time.monotonic()) if running else None

    def join(self, deadline: float) -> bool:
        """Wait until every idle worker thread ended (after :meth:`halt`), up to ``deadline``
        (monotonic); True when all ended.

        A worker still inside a callback cannot be stopped; it is a daemon thread, so it
        does not keep the process alive, and it exits its loop once the callback returns.
        """
        for index, thread in enumerate(self._threads):
            if self._busy[index] is None:  # a busy one ends only when its callback returns
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def shutdown(self) -> None:
        """Forget this dispatcher at exit (``stop()`` calls it last): no exit warning for it."""
        _running.discard(self)

    @property
    def halted(self) -> bool:
        """:meth:`halt` was called: no new items are taken."""
        return self._halt.is_set()

    @property
    def bus_name(self) -> str:
        """The name of the bus this dispatcher works for (thread names, deliveries, logs)."""
        return self._bus_name

    # -- feeding ---------------------------------------------------------------

    def coalesce(self, on_coalesced: Callable[[WorkItem], None] | None = None) -> CoalescingLanes:
        """Replace waiting events by newer ones of their document from now on (``Bus(coalesce=True)``).

        Call it before the first item is admitted. Returns the lanes (they count what they replaced).
        """
        if len(self.lanes):
            raise RuntimeError("coalesce() after items were admitted")
        lanes = CoalescingLanes(on_coalesced)
        self.lanes = lanes
        return lanes

    def admit(self, item: WorkItem) -> WorkItem | None:
        """Queue ``item`` in its lane (caller holds the lock); returns it when it may run now.

        Pass what it returns to :meth:`enqueue` after releasing the lock.
        """
        if item.lane is None:
            return item
        return self.lanes.push(item.lane, item)

    def enqueue(self, item: WorkItem | FanOut) -> None:
        """Hand a runnable item (from :meth:`admit` or :meth:`fan_out`) to the workers."""
        self._ready.put(item)

    def enqueue_all(self, items: list[WorkItem | FanOut]) -> None:
        """:meth:`enqueue` each of ``items``, in order (one call per run of events, not per event)."""
        put = self._ready.put
        for item in items:
            put(item)

    def fan_out(
        self,
        subs: Sequence[Subscription],
        event: ChangeEvent,
        slot: Slot,
        key: Hashable | None,
        update_description: Any,
        runnable: list[WorkItem | FanOut],
    ) -> None:
        """Admit ``event`` for several subscriptions (caller holds the lock); append what may run now.

        ``key`` names the lanes: the document (``ordering="document"``), :data:`STREAM_LANE`
        (``"stream"``), or ``None`` (``"none"``, no lanes). Each subscription keeps its own
        order per key, as with a lane ``(subscription index, key)`` each. When nothing of
        ``key`` is in flight (the usual case) one :class:`FanOut` carries the event for all of
        them; else each gets a ``WorkItem`` in its own lane, behind whatever it has in flight
        there, so a subscription that is slow or retrying on a document holds back only its
        own later events of that document.
        """
        self._fanning = True
        if key is None or (key not in self._fanouts and key not in self._solo):
            item = FanOut(subs, event, slot, key, update_description)
            if key is not None:
                self._fanouts[key] = item
            runnable.append(item)
            return
        lanes = self.lanes
        busy = self._fanouts.get(key)
        held: set[int] = set()  # subscriptions whose part of the fan-out in flight is not reported
        if busy is not None:
            # Set before reporting: a worker that finishes a part after this reports it itself.
            busy.watched = True
            self._report_parts(busy)
            held = {s.index for s in busy.subs}.difference(s.index for s in busy.finished[: busy.seen])
        for sub in subs:
            lane = (sub.index, key)
            part = WorkItem(sub, event, slot, lane, update_description)
            part.solo = True
            if lane in lanes:
                lanes.push(lane, part)  # waits (or replaces a waiting one, coalesce=True)
                continue
            self._solo[key] = self._solo.get(key, 0) + 1
            if sub.index in held:
                lanes.wait_behind(lane, part)  # its part of the fan-out is still under way
            else:
                lanes.push(lane, part)
                runnable.append(part)

    # -- workers -----------------------------------------------------------------

    def _next(self) -> WorkItem | FanOut | None:
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

    def _help(self) -> FanOut | None:
        """A fan-out another worker runs, with subscriptions nobody took yet (this worker is idle)."""
        for item in self._busy:
            if isinstance(item, FanOut) and length_hint(item.claims):
                return item
        return None

    def _report_parts(self, item: FanOut, slots: list[Slot] | None = None) -> None:
        """Report the parts of ``item`` finished since last time (caller holds the lock)."""
        finished = item.finished
        end = len(finished)  # workers may append meanwhile: those are reported next time
        new = end - item.seen
        if not new:
            return
        own = slots is None
        if slots is None:
            slots = []
        # The parts are one subscription each of the same slot: count all but one here, and
        # let on_done count the last, so it runs once per report, not once per subscription
        # (it records the ack and moves the watermark when the slot's count reaches zero).
        item.slot.remaining -= new - 1
        slots.append(item.slot)
        key = item.key
        if item.watched:  # a later event waits in a subscription's lane behind its part
            lanes = self.lanes
            for sub in finished[item.seen : end]:
                lane = (sub.index, key)
                if lane in lanes:
                    self._lane_ended(lane, key)
        item.seen = end
        if end == len(item.subs) and key is not None and self._fanouts.get(key) is item:
            del self._fanouts[key]
        if own:
            self._on_done(slots)

    def _lane_ended(self, lane: Hashable, key: Hashable) -> None:
        """The active item of per-subscription lane ``lane`` (of ``key``) ended: run its next one."""
        successor = self.lanes.pop_next(lane)
        if successor is not None:
            self._ready.put(successor)
        else:
            count = self._solo[key] - 1
            if count:
                self._solo[key] = count
            else:
                del self._solo[key]

    def drain(self) -> None:
        """Report finished items and queue their lanes' successors (caller holds the lock)."""
        done = self.finished
        if not done:
            return
        lanes = self.lanes
        put = self._ready.put
        slots: list[Slot] = []
        while done:
            item = done.popleft()
            if isinstance(item, FanOut):
                self._report_parts(item, slots)
                continue
            if item.parent is not None:  # a retried part of a fan-out: reported as that part
                item.parent.finished.append(item.sub)
                self._report_parts(item.parent, slots)
                continue
            slots.append(item.slot)
            if item.covered is not None:  # the events it replaced are done only now
                slots.extend(item.covered)
            if item.solo:
                self._lane_ended(item.lane, cast(tuple[int, Hashable], item.lane)[1])
            elif item.lane is not None:
                successor = lanes.pop_next(item.lane)
                if successor is not None:
                    put(successor)
        self._on_done(slots)  # once per run: the watermark moves once, not once per item

    def _work(self, index: int) -> None:
        busy = self._busy
        lock = self._lock
        done = self.finished
        share = self.max_workers > 1
        gate = self._gate
        get = self._ready.get
        timers = self._timers
        while not self._halting:  # halt.is_set() without a call
            # About to wait for work: first help a fan-out another worker is running.
            # (A bus with one subscription never fans out: it skips the queue's lock and the scan.)
            item: WorkItem | FanOut | None = (
                self._help() if share and self._fanning and self._ready.empty() else None
            )
            if item is None:
                if timers:
                    item = self._next()
                else:  # _next() without retries due, inlined: this runs once per event
                    try:
                        item = get(timeout=0.1)
                    except queue.Empty:
                        item = None
            if item is None:
                if done:  # idle: waiting for the lock costs nothing now
                    with lock:
                        self.drain()
                continue
            if len(done) >= _REPORT_AT:  # many unreported items: try before a callback that may be long
                self._try_drain()
            # Busy before the halt check: halt() sets _halting before wait_idle() reads busy,
            # so either this worker sees the halt or the stopper sees it busy and waits.
            busy[index] = item
            try:
                halted = (
                    gate is not None and not gate() and not self._gate_reopened(gate, index)
                ) or self._halting
            except BaseException:  # the gate failed: this worker runs nothing (the bus hears of it)
                busy[index] = None
                raise
            if halted:  # (_halting: halt.is_set() without a call)
                busy[index] = None
                return  # the item stays undone
            if isinstance(item, FanOut):
                self._run_fanout(index, item)
                continue
            try:
                outcome, delay = self._attempt(item)
            except BaseException as exc:
                raise self._escaped(item.sub, item.event, exc) from exc
            finally:
                busy[index] = None
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

    def _gate_reopened(self, gate: Callable[[], bool], index: int) -> bool:
        """The gate closed (the lease is overdue by the clock): wait until it opens again
        (True) or the dispatcher is halted (False). Returning from the loop instead would
        leave a partition renewed late without workers: a stall under a running bus.

        Worker ``index`` is not busy meanwhile (it runs no callback: a stop need not wait for
        it), and busy with its item again once the gate opens."""
        item = self._busy[index]
        self._busy[index] = None
        while not self._halt.wait(GATE_PAUSE):
            if gate():
                self._busy[index] = item
                return True
        return False

    def _run_fanout(self, index: int, item: FanOut) -> None:
        """Run the parts of ``item`` this worker can claim, one after another."""
        item.offered = False
        busy = self._busy
        busy_sub = self._busy_sub
        done = self.finished
        halted = self._halt.is_set
        ready = self._ready
        finished = item.finished
        claims = item.claims
        event = item.event
        share = self.max_workers > 1
        plain = not self._middleware
        sub: Subscription | None = None

        # current_delivery() builds the Delivery of the subscription running now: one context
        # variable setting per run of parts, not one per part (unless a callback asked for
        # its Delivery: current_delivery() then keeps it in the variable, set back below).
        def builder() -> Delivery:
            return self._part_delivery(item, sub)

        token = _current.set(builder)
        busy[index] = item
        try:
            for sub in claims:
                if halted():
                    return
                busy_sub[index] = sub
                if _current.get() is not builder:
                    _current.set(builder)
                if share and not item.offered and length_hint(claims) and ready.empty():
                    # Others may be idle: let one of them take the next parts, so that a slow
                    # callback here does not hold back the other subscriptions' deliveries.
                    item.offered = True
                    ready.put(item)
                part: WorkItem | None = None
                try:
                    if plain and not sub.wants_delivery and sub.idempotency is None:
                        # call_subscription without middleware, inlined (this runs once per part),
                        # and sub.argument() too when the callback takes the event as it is.
                        try:
                            if sub.payload is None and not sub.full_document_only:
                                sub.callback(event)
                            else:
                                sub.callback(sub.argument(event, self._decoder))
                        except Exception as exc:
                            part = self._part(item, sub)
                            outcome, delay = self._settle(part, None, exc)
                        else:
                            outcome = _DONE
                    else:
                        part = self._part(item, sub)
                        outcome, delay = self._attempt(part)
                except BaseException as exc:
                    raise self._escaped(sub, event, exc) from exc
                if outcome == _DONE:
                    finished.append(sub)
                    if item.watched:  # a later event of this key waits for this part: report it now
                        done.append(item)
                        self._try_drain()
                elif outcome == _RETRY:
                    assert part is not None
                    with self._lock:
                        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._counter), part))
        finally:
            busy[index] = None
            busy_sub[index] = None
            _current.reset(token)
        done.append(item)
        if len(done) >= _REPORT_AT or ready.empty():
            self._try_drain()

    def _part(self, item: FanOut, sub: Subscription) -> WorkItem:
        """``sub``'s part of ``item`` as an item of its own (for its retries and dead letter)."""
        part = WorkItem(sub, item.event, item.slot, None, item.update_description)
        part.parent = item
        return part

    def _part_delivery(self, item: FanOut, sub: Subscription | None) -> Delivery:
        assert sub is not None
        return Delivery(
            event=item.event,
            subscription=sub.name,
            attempt=1,
            update_description=item.update_description,
            cluster_time=item.event.cluster_time,
            bus=self._bus_name,
        )

    def _escaped(self, sub: Subscription, event: ChangeEvent, exc: BaseException) -> ThreadFailed:
        # Not an Exception (a callback's SystemExit or KeyboardInterrupt), or a failure
        # outside the callback (middleware, retry_backoff, an error whose repr() raises):
        # the bus stops; retrying would only hide it. The event stays undone.
        thread = threading.current_thread().name
        return ThreadFailed(
            f"worker {thread} stopped on event {event.id} for subscription {sub.name!r}: "
            f"{describe(exc)} escaped the callback or its middleware, decoder or retry_backoff. "
            "The bus stops without retrying it; the event is delivered again after restart",
            thread=thread,
        )

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
        if item.failure is not None:  # only its dead-letter write failed: retry the write, not the callback
            return self._give_up(item, self._delivery(item), item.failure)
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
                if sub.payload is None and not sub.full_document_only:  # argument() would return the event
                    sub.callback(item.event)
                else:
                    sub.callback(sub.argument(item.event, self._decoder))
            except Exception as exc:
                error = exc
            finally:
                _current.reset(token)
        if error is None or isinstance(error, Skip):  # skipped (or a duplicate): done, not an error
            return _DONE, 0.0
        return self._settle(item, delivery, error)

    def _settle(self, item: WorkItem, delivery: Delivery | None, error: BaseException) -> tuple[int, float]:
        """What a failed attempt of ``item`` leads to: a retry, a dead letter, a skip or a stop."""
        sub = item.sub
        if isinstance(error, Skip):
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
            sub.name,
            item.event.id,
            item.attempt,
            sub.max_retries + 1,
            error,
            delay,
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
                item.failure = error
                item.dead_letter_tries += 1
                delay = sub.retry_backoff.delay(item.dead_letter_tries)
                log.error(
                    "could not dead-letter event %s for %r (%s); it stays undone, the checkpoint stays before it, "
                    "and the write (not the callback) is retried in %.2fs",
                    item.event.id,
                    sub.name,
                    describe(exc),
                    delay,
                )
                return _RETRY, delay
            log.error(
                "event %s dead-lettered for %r after %d attempt(s): %r",
                item.event.id,
                sub.name,
                attempts,
                error,
            )
            run_after(self._middleware, "after_dead_letter", delivery, error)
            return _DONE, 0.0
        if sub.on_exhausted == "skip":
            log.error(
                "event %s skipped by %r after %d attempt(s) (on_exhausted='skip', no dead-letter store): %r",
                item.event.id,
                sub.name,
                attempts,
                error,
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


def _start_daemon_workers(
    executor: ThreadPoolExecutor, loops: Sequence[Callable[[], None]]
) -> list[threading.Thread]:
    """Run each loop on its own thread of ``executor``; those threads never hold up exit.

    A thread inherits ``daemon`` from the thread that creates it (threading's documented
    default), and the executor creates its threads inside ``submit``: submitting from a
    daemon thread makes daemon workers. concurrent.futures also joins every executor thread
    at interpreter exit (its ``_threads_queues`` registry), which would wait forever for a
    callback that never returns; our threads leave that registry, since ``stop()`` joins them
    itself, with a deadline. Returns the worker threads, in the order of ``loops``.
    """
    threads: list[threading.Thread | None] = [None] * len(loops)
    started = threading.Semaphore(0)

    def run(index: int, loop: Callable[[], None]) -> None:
        threads[index] = threading.current_thread()
        started.release()
        loop()

    def submit_all() -> None:
        for index, loop in enumerate(loops):
            executor.submit(run, index, loop)

    submitter = threading.Thread(target=submit_all, name="mongo_events.worker-starter", daemon=True)
    submitter.start()
    submitter.join()
    for _ in loops:
        # Thread.start() inside submit() returned, so each run() is under way: this is brief.
        started.acquire(timeout=10.0)
    registry = getattr(concurrent.futures.thread, "_threads_queues", None)
    for thread in threads:
        if registry is not None:
            registry.pop(thread, None)
    return [t for t in threads if t is not None]


def _warn_at_exit() -> None:
    """Say that a bus was never stopped: its unfinished events are delivered again after restart.

    A warning only: it stops nothing (the workers are daemon threads; exit never waits for them).
    """
    for dispatcher in list(_running):
        if not dispatcher.halted:
            log.warning(
                "interpreter exiting while bus %s still runs; call stop() for a final checkpoint",
                dispatcher.bus_name,
            )


atexit.register(_warn_at_exit)


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
