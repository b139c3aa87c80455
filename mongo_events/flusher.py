"""The flusher: one thread that writes checkpoints (and other batched records) to stores.

It wakes every ``interval`` seconds, or sooner when asked, and runs each
registered flush task. A task that fails is logged and simply runs again next
time: the checkpoint stays behind, which is safe.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

__all__ = ["Flusher"]

log = logging.getLogger(__name__)


class Flusher:
    """Runs ``tasks`` periodically on a named daemon thread, and once more at stop."""

    def __init__(self, tasks: Sequence[Callable[[], None]], interval: float, name: str) -> None:
        self._tasks = list(tasks)
        self.interval = interval
        self._name = name
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one flush at a time: thread tick vs explicit flush()
        self._thread: threading.Thread | None = None
        self.failures = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mongo_events.flusher[{self._name}]", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def flush(self) -> bool:
        """Run every task now, on the caller's thread; True when all succeeded."""
        ok = True
        with self._lock:
            for task in self._tasks:
                try:
                    task()
                except Exception as exc:
                    ok = False
                    self.failures += 1
                    log.warning("flush of %s failed (%s); it is retried, and the checkpoint stays behind meanwhile", self._name, exc)
        return ok

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, timeout))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.flush()
