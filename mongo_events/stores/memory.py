"""In-memory resume-token store, for tests and single-process scripts."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from bson.timestamp import Timestamp

from .base import Checkpoint, ResumeTokenStore

__all__ = ["MemoryResumeTokenStore"]


class MemoryResumeTokenStore(ResumeTokenStore):
    """Keeps tokens in a dict: positions last as long as the process.

    :ivar saves: number of ``save`` calls, for tests that count writes.

    .. versionadded:: 0.1.0
    """

    def __init__(self) -> None:
        self._data: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()
        self.saves = 0

    def load(self, key: str) -> Checkpoint | None:
        with self._lock:
            return self._data.get(key)

    def save(self, key: str, token: Mapping[str, Any], cluster_time: Timestamp | None = None) -> None:
        with self._lock:
            self._data[key] = Checkpoint(dict(token), cluster_time, datetime.now(timezone.utc))
            self.saves += 1

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)
