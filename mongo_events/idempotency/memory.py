"""An in-memory idempotency store, for tests and single-process use."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from .base import Claim, ClaimStatus, IdempotencyStore, check_processing_ttl

__all__ = ["MemoryIdempotencyStore"]

#: Expired keys are swept once per this many claims.
_SWEEP_EVERY = 1024


class _Entry:
    __slots__ = ("expires", "starts", "status", "until")

    def __init__(self, status: str, until: float, expires: float, starts: int) -> None:
        self.status = status  # "claimed", "completed" or "released"
        self.until = until  # a claim is held until then (monotonic)
        self.expires = expires  # the entry is forgotten then (monotonic)
        self.starts = starts  # claims started and not finished


class MemoryIdempotencyStore(IdempotencyStore):
    """Keys in a dict, with the same claim, complete and release semantics as the shared stores.

    Only one process sees it: use :class:`MongoIdempotencyStore` or
    :class:`RedisIdempotencyStore` when several processes handle the same events, or
    to detect events that crash the process.

    :param ttl: how long a completed key is remembered.

    .. versionadded:: 0.1.0
    """

    def __init__(self, ttl: timedelta = timedelta(hours=24)) -> None:
        super().__init__(ttl)
        self._keys: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._claims = 0

    def try_claim(self, key: str, processing_ttl: timedelta) -> Claim:
        hold = check_processing_ttl(processing_ttl)
        now = time.monotonic()
        with self._lock:
            self._claims += 1
            if self._claims % _SWEEP_EVERY == 0:
                self._sweep(now)
            entry = self._keys.get(key)
            starts = 0
            if entry is not None and entry.expires > now:
                starts = entry.starts
                if entry.status == "completed":
                    return Claim(ClaimStatus.COMPLETED, starts)
                if entry.status == "claimed" and entry.until > now:
                    return Claim(ClaimStatus.BUSY, starts)
            starts += 1
            self._keys[key] = _Entry("claimed", now + hold, now + max(hold, self.ttl.total_seconds()), starts)
            return Claim(ClaimStatus.CLAIMED, starts)

    def complete(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._keys[key] = _Entry("completed", now, now + self.ttl.total_seconds(), 0)

    def release(self, key: str) -> None:
        with self._lock:
            entry = self._keys.get(key)
            if entry is not None and entry.status == "claimed":
                entry.status = "released"
                entry.until = time.monotonic()
                entry.starts = max(0, entry.starts - 1)

    def remove(self, key: str) -> None:
        with self._lock:
            self._keys.pop(key, None)

    def __len__(self) -> int:
        """Keys remembered (expired ones included until the next sweep)."""
        with self._lock:
            return len(self._keys)

    def _sweep(self, now: float) -> None:
        for key in [k for k, e in self._keys.items() if e.expires <= now]:
            del self._keys[key]
