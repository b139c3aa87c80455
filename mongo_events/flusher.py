"""The flusher: one thread that writes checkpoints (and other batched records) to stores.

It wakes every ``interval`` seconds, or sooner when asked, and runs each
registered flush task. A task that fails is logged and simply runs again next
time: the checkpoint stays behind, which is safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar

import pymongo

from .guard import describe, run_guarded

__all__ = ["Flusher", "time_left"]

log = logging.getLogger(__name__)

#: The deadline (monotonic) of the bounded flush running in this context: for tasks that
#: wait on something ``pymongo.timeout()`` does not bound, such as a lock.
_DEADLINE: ContextVar[float | None] = ContextVar("mongo_events_flush_deadline", default=None)


def time_left() -> float | None:
    """Seconds the flush running this task has left; ``None`` when it is not bounded."""
    deadline = _DEADLINE.get()
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _fail_loudly(exc: BaseException) -> None:
    log.error("flusher died: %s", describe(exc))


class Flusher:
    """Runs ``tasks`` periodically on a named daemon thread, and once more at stop.

    :param on_fatal: receives the error if the thread dies (the bus then fails).
    """

    def __init__(
        self,
        tasks: Sequence[Callable[[], None]],
        interval: float,
        name: str,
        on_fatal: Callable[[BaseException], None] = _fail_loudly,
    ) -> None:
        self._tasks = list(tasks)
        self.interval = interval
        self._name = name
        self._on_fatal = on_fatal
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one flush at a time: thread tick vs explicit flush()
        self._thread: threading.Thread | None = None
        self.failures = 0

    def start(self) -> None:
        thread = f"mongo_events.flusher[{self._name}]"
        self._thread = threading.Thread(
            target=run_guarded, args=(self._run, self._on_fatal, thread), name=thread, daemon=True
        )
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def flush(self, timeout: float | None = None) -> bool:
        """Run every task now, on the caller's thread; True when all succeeded.

        With ``timeout`` (seconds), the whole flush is bounded: it waits that long at most
        for a flush already running, and its MongoDB operations run under
        ``pymongo.timeout()``, so an unreachable server cannot hold it for pymongo's
        default 30-second server selection (or longer).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            self.failures += 1
            log.error(
                "flush of %s did not start within %.1fs: a flush already running is stuck (is the store reachable?)",
                self._name,
                timeout,
            )
            return False
        ok = True
        outer = _DEADLINE.get()  # a flush inside a bounded one keeps the outer bound
        bounded = _DEADLINE.set(
            outer if outer is not None and (deadline is None or outer < deadline) else deadline
        )
        try:
            for task in self._tasks:
                try:
                    if deadline is None:
                        task()
                    else:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise TimeoutError(f"no time left within {timeout:.1f}s")
                        with pymongo.timeout(remaining):
                            task()
                except Exception as exc:
                    ok = False
                    self.failures += 1
                    log.warning(
                        "flush of %s failed (%s); it is retried at the next flush, and what it writes "
                        "(the checkpoint, monitor entries) waits meanwhile",
                        self._name,
                        exc,
                    )
        finally:
            _DEADLINE.reset(bounded)
            self._lock.release()
        return ok

    def stop(self, timeout: float) -> bool:
        """Stop the thread; True when it ended within ``timeout``."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, timeout))
            return not self._thread.is_alive()
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.flush()
