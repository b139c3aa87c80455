"""The window: one stream's events between its stored checkpoint and the head, under one lock.

It wraps the pure :class:`~mongo_events.tracking.Tracker` (sequence numbers, the bounded
window and the watermark) with the lock and condition that guard it, and with the waits
around it: for room when it is full, for every admitted event before a barrier or a
``join()``. The watcher admits into it, the workers :meth:`Window.finish` in it (through
the dispatcher, which shares its lock), and the flusher takes its checkpoint from it.

The lock is an ``RLock`` used directly on hot paths: ``with window.mutex`` runs in C,
``with window.cond`` goes through two Python-level methods. Holding either is the same.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from .stores.records import AckRecord
from .tracking import Slot, Tracker

__all__ = ["Window"]


def _nothing() -> None:
    return None


class Window:
    """One stream's in-flight window, its lock, and the waits on it.

    :param capacity: ``max_in_flight``: most events held after the stored checkpoint.
    :param durable: ``False`` when no checkpoint is stored (``resume=False``).
    :param acks: keep ack records for the flusher (an ack store is configured).
    :param stop_event: set when the bus stops: every wait here gives up.
    """

    def __init__(self, capacity: int, *, durable: bool, acks: bool, stop_event: threading.Event) -> None:
        self.mutex = threading.RLock()
        self.cond = threading.Condition(self.mutex)
        self.tracker = Tracker(capacity, durable=durable)
        #: While the watcher waits for room: the window size that wakes it (else -1).
        self.room_low = -1
        #: Threads in wait_for_done (join(), a barrier): finish() notifies them on every step.
        self.joining = 0
        #: Ack records to write next (event id -> record), or None without an ack store.
        self.acks: dict[str, AckRecord] | None = {} if acks else None
        self._stop = stop_event
        #: Reports what workers finished but could not report yet (the dispatcher's drain()).
        self.report_done: Callable[[], None] = _nothing
        #: Asks the flusher for a checkpoint write now (only a write can free room).
        self.wake_flusher: Callable[[], None] = _nothing
        #: A write was asked for and its flush has not ended: do not ask again meanwhile
        #: (a slow write would otherwise be followed at once by a second, small one).
        self.flush_asked = False

    def connect(self, report_done: Callable[[], None], wake_flusher: Callable[[], None]) -> None:
        """Wire the dispatcher's ``drain`` and the flusher's ``wake`` (both built after the window)."""
        self.report_done = report_done
        self.wake_flusher = wake_flusher

    # -- reading (caller holds the lock unless said otherwise) ----------------------------

    def drain(self) -> int:
        """Report what workers finished but could not report yet; returns the window size.

        Caller holds the lock. Workers report without waiting for it (see
        ``Dispatcher.drain``), so whoever holds it next does it for them.
        """
        self.report_done()
        return len(self.tracker)

    def checkpoint(self) -> object:
        """The in-memory checkpoint: the token the flusher writes next (takes the lock)."""
        with self.mutex:
            return self.tracker.checkpoint

    def size(self) -> int:
        """Events held after the stored checkpoint (takes the lock)."""
        with self.mutex:
            return len(self.tracker)

    def pending(self) -> int:
        """Admitted events some subscription has not finished yet (takes the lock)."""
        with self.mutex:
            self.drain()
            return self.tracker.unfinished

    # -- the watcher side -----------------------------------------------------------------

    def admit(self, token: object, cluster_time: object, subscriptions: int, event_id: str) -> Slot:
        """Admit one event (caller holds the lock and made room); with 0 subscriptions it is done.

        The stream consumer's hot path inlines this (``tracker.begin`` under ``mutex``).
        """
        tracker = self.tracker
        slot = tracker.begin(token, cluster_time, subscriptions, event_id)
        if not subscriptions:
            tracker.advance()
            if self.joining:
                self.cond.notify_all()
        return slot

    def note_resume_token(self, token: object) -> None:
        """The stream's post-batch token (takes the lock)."""
        with self.mutex:
            self.drain()
            self.tracker.note_resume_token(token)

    def ask_for_flush(self) -> None:
        """Wake the flusher, unless a flush it was asked for has not ended yet (caller holds the lock)."""
        if not self.flush_asked:
            self.flush_asked = True
            self.wake_flusher()

    def flush_ended(self) -> None:
        """The checkpointer's flush ended (written or not): a full window may ask again."""
        with self.mutex:
            self.flush_asked = False
            if self.room_low >= 0:
                self.cond.notify_all()  # the watcher re-checks: ask again if still no room

    def wait_for_room(self) -> bool:
        """The window is full: wait (holding the lock) until three quarters of it are free.

        Done events that only wait on a checkpoint write are freed by a flush, and each
        write frees the finished events at the head. So the flusher is woken only when
        a write frees those three quarters (the unwritten finished head reached them, or
        nothing else is left to finish), and the watcher then admits a run of that size:
        with a slow handler as with a fast one, a full window costs about one write per
        ``0.75 * max_in_flight`` events, and the workers keep the last quarter to work on
        meanwhile. (A step of 256 events cost one write per 256 with a slow handler.)
        False when stopping. The caller handed its collected work to the workers first.
        """
        tracker = self.tracker
        self.room_low = tracker.capacity - max(1, tracker.capacity * 3 // 4)
        try:
            while self.drain() > self.room_low:
                if self._stop.is_set():
                    return False
                if tracker.unflushed and len(tracker) - tracker.unflushed <= self.room_low:
                    self.ask_for_flush()  # a write frees enough room now (else finish() asks later)
                self.cond.wait(0.1)
        finally:
            self.room_low = -1
        return True

    def wait_until_idle(self) -> bool:
        """Wait (holding the lock) until every admitted event is done; False when stopping.

        The barrier around a namespace-wide event under ``ordering="document"``. Such
        events are rare (DDL), so the watcher simply waits; retries and slow callbacks
        hold it as a full window would. The caller handed its collected work on first.
        """
        self.wait_for_done(self.tracker.last_seq, None, self._stop.is_set)
        return not self._stop.is_set()

    def wait_for_done(self, target: int, deadline: float | None, give_up: Callable[[], bool]) -> bool:
        """Wait (holding the lock) until every event up to sequence ``target`` is done (True),
        ``deadline`` (a ``time.monotonic()`` value) passes or ``give_up()`` (False: not all done)."""
        self.joining += 1  # finish() notifies on every step while someone waits here
        try:
            while True:
                self.drain()
                first = self.tracker.first_seq()
                if first is None or first > target:
                    return True
                if give_up():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self.cond.wait(0.1 if remaining is None else min(0.1, remaining))
        finally:
            self.joining -= 1

    # -- the worker side ------------------------------------------------------------------

    def finish(self, slots: list[Slot]) -> None:
        """Subscriptions finished these slots; the dispatcher calls this holding the lock."""
        tracker = self.tracker
        acks = self.acks
        finish = tracker.finish  # hoisted: this loop runs once per finished item
        for slot in slots:
            finish(slot)
            if acks is not None and slot.remaining <= 0:
                pending = acks.get(slot.event_id)
                now = datetime.now(timezone.utc)
                acks[slot.event_id] = AckRecord(slot.event_id, pending.created_at if pending else now, now)
        if tracker.head_done:
            tracker.advance()
            if self.joining:
                self.cond.notify_all()
            elif self.room_low >= 0:  # the watcher waits for room
                size = len(tracker)
                if size <= self.room_low:
                    self.cond.notify_all()
                elif size - tracker.unflushed <= self.room_low:
                    # Only a checkpoint write can free the room it waits for: write now.
                    self.ask_for_flush()
