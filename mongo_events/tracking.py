"""In-flight bookkeeping: sequence numbers, the bounded window and the watermark.

Pure logic: no threads, no I/O, no locks. The bus guards a :class:`Tracker`
with one lock; everything here is O(1) per event (amortised).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Any, Generic, TypeVar

__all__ = ["Lanes", "Slot", "Tracker"]

T = TypeVar("T")


class Slot:
    """One event between the checkpoint and the head of the stream.

    ``remaining`` counts the subscriptions that have not finished with it.
    ``after_token`` is a post-batch token noted while this was the newest slot:
    once this slot is checkpointed, that token is the safer, newer position.
    """

    __slots__ = ("after_token", "cluster_time", "event_id", "remaining", "seq", "token")

    def __init__(self, seq: int, token: Any, cluster_time: Any, remaining: int, event_id: str) -> None:
        self.seq = seq
        self.token = token
        self.cluster_time = cluster_time
        self.remaining = remaining
        self.after_token: Any = None
        self.event_id = event_id

    @property
    def done(self) -> bool:
        return self.remaining <= 0

    def __repr__(self) -> str:
        return f"Slot(seq={self.seq}, remaining={self.remaining}, id={self.event_id!r})"


class Tracker:
    """The window of events after the checkpoint and the contiguous watermark.

    The checkpoint is the token of the newest event such that it and every
    earlier event are done. The window holds every event after the *stored*
    checkpoint, finished or not: the unfinished ones, the finished ones behind
    them, and those the in-memory checkpoint passed but no flush has stored yet
    (``unflushed``). So a blocked event keeps it from growing past ``capacity``,
    and a crash redelivers at most ``capacity`` events.

    :param durable: ``False`` when nothing is stored (``resume=False``): then
        ``unflushed`` is not counted.
    """

    def __init__(self, capacity: int, durable: bool = True) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._window: deque[Slot] = deque()
        self._next_seq = 1
        self.checkpoint: Any = None
        self.checkpoint_time: Any = None
        #: Incremented each time the checkpoint moves; lets a writer skip unchanged positions.
        self.version = 0
        #: Set when finished events (not just an idle post-batch token) moved the checkpoint.
        self.moved_by_events = False
        #: Events the in-memory checkpoint passed that no flush has stored yet.
        self.unflushed = 0
        #: Admitted events some subscription has not finished yet (this process's pending count).
        self.unfinished = 0
        self._durable = durable

    def __len__(self) -> int:
        """Events after the stored checkpoint (what a crash now would redeliver, at most)."""
        return len(self._window) + self.unflushed

    @property
    def full(self) -> bool:
        return len(self._window) + self.unflushed >= self.capacity

    def persisted(self, events: int) -> None:
        """A flush stored a checkpoint that covered ``events`` more events."""
        self.unflushed = max(0, self.unflushed - events)

    @property
    def idle(self) -> bool:
        """Nothing after the checkpoint."""
        return not self._window

    def begin(self, token: Any, cluster_time: Any, subscriptions: int, event_id: str = "") -> Slot:
        """Admit an event that ``subscriptions`` subscriptions must finish (0: already done)."""
        slot = Slot(self._next_seq, token, cluster_time, subscriptions, event_id)
        self._next_seq += 1
        if subscriptions > 0:
            self.unfinished += 1
        self._window.append(slot)
        return slot

    @property
    def head_done(self) -> bool:
        """The oldest event in the window is done: :meth:`advance` would move the checkpoint."""
        window = self._window
        return bool(window) and window[0].remaining <= 0

    def finish(self, slot: Slot) -> bool:
        """One subscription is done with ``slot``; True when the checkpoint may now move."""
        slot.remaining -= 1
        if slot.remaining == 0:
            self.unfinished -= 1
        return slot.remaining <= 0 and self._window[0] is slot

    def note_resume_token(self, token: Any) -> None:
        """Record the stream's post-batch token: every event before it has been admitted.

        With nothing in flight it becomes the checkpoint at once (a quiet or filtered
        stream keeps a fresh position); otherwise it waits on the newest slot.
        """
        if token is None:
            return
        if self._window:
            self._window[-1].after_token = token
        elif token != self.checkpoint:
            self.checkpoint = token
            self.version += 1

    def advance(self) -> int:
        """Drop the done prefix of the window and move the checkpoint; returns how many moved."""
        window = self._window
        moved = 0
        last: Slot | None = None
        while window and window[0].remaining <= 0:
            slot = window.popleft()
            moved += 1
            if self._durable:
                self.unflushed += 1
            # A slot without a token (an invalidate) never becomes the checkpoint: resuming
            # after the event before it replays the invalidate, which is safe.
            if slot.token is not None or slot.after_token is not None:
                last = slot
        if last is not None:
            token = last.after_token if (last.after_token is not None and not window) else last.token
            if token is None:  # an invalidate carrying a post-batch token with work still behind it
                return moved
            self.checkpoint = token
            self.checkpoint_time = last.cluster_time
            self.version += 1
            self.moved_by_events = True
        return moved

    def first_seq(self) -> int | None:
        """Sequence number of the oldest slot in the window, or ``None`` when idle."""
        return self._window[0].seq if self._window else None

    @property
    def last_seq(self) -> int:
        """Sequence number of the newest admitted event (0 before the first)."""
        return self._next_seq - 1


class Lanes(Generic[T]):
    """Per-key FIFO lanes: at most one item per key is active; the rest wait in order.

    ``push`` returns the item when its lane was idle (run it now) or ``None`` (it waits);
    ``pop_next`` is called when the active item of a lane is finished and returns the
    next item to run, if any.
    """

    def __init__(self) -> None:
        # key -> waiting items; None while the lane's one item runs and nothing waits
        # (no deque is allocated for the common case of one event per document at a time).
        self._waiting: dict[Hashable, deque[T] | None] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, key: Hashable) -> bool:
        """The lane ``key`` has an active item (and maybe waiting ones)."""
        return key in self._waiting

    def wait_behind(self, key: Hashable, item: T) -> None:
        """Open lane ``key`` with ``item`` waiting: its active item is held elsewhere (a fan-out's
        part for this lane's subscription), and :meth:`pop_next` releases ``item`` when it ends."""
        assert key not in self._waiting
        self._waiting[key] = deque((item,))

    def push(self, key: Hashable, item: T) -> T | None:
        waiting = self._waiting
        if key not in waiting:
            waiting[key] = None
            return item
        queue = waiting[key]
        if queue is None:
            queue = waiting[key] = deque()
        queue.append(item)
        return None

    def pop_next(self, key: Hashable) -> T | None:
        waiting = self._waiting
        if key not in waiting:
            return None
        queue = waiting[key]
        if queue:
            return queue.popleft()
        del waiting[key]
        return None

    def discard(self, key: Hashable) -> list[T]:
        """Forget a lane; returns the items that were waiting in it."""
        queue = self._waiting.pop(key, None)
        return list(queue) if queue else []
