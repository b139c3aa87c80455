"""An in-memory lease store, for tests and for several buses in one process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import attrs

from .base import GroupConfig, Lease, LeaseStore, Owner, check_ttl, mismatch

__all__ = ["MemoryLeaseStore"]


@attrs.define
class _Entry:
    owner: Owner | None
    fence: int
    expires: float


class MemoryLeaseStore(LeaseStore):
    """Leases in a dict, judged by one injected clock (``time.monotonic`` by default).

    :param clock: seconds, monotonic; tests pass a fake clock to expire leases deterministically.
    :ivar writes: number of lease writes (acquire, renew, release), for tests that count round trips.

    .. versionadded:: 0.2.0
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, _Entry] = {}
        self._groups: dict[str, GroupConfig] = {}  # by GroupConfig.document_key
        self.writes = 0

    def acquire(self, key: str, owner: Owner, ttl: float) -> Lease | None:
        check_ttl(ttl)
        with self._lock:
            self.writes += 1
            now = self._clock()
            entry = self._leases.get(key)
            if entry is not None and entry.owner == owner and entry.expires > now:
                entry.expires = now + ttl
                return Lease(key, owner, entry.fence)
            if entry is not None and entry.owner is not None and entry.expires > now:
                return None
            fence = (entry.fence if entry is not None else 0) + 1
            self._leases[key] = _Entry(owner, fence, now + ttl)
            return Lease(key, owner, fence)

    def renew(self, lease: Lease, ttl: float) -> bool:
        check_ttl(ttl)
        with self._lock:
            self.writes += 1
            entry = self._leases.get(lease.key)
            if entry is None or entry.owner != lease.owner or entry.fence != lease.fence:
                return False
            entry.expires = self._clock() + ttl
            return True

    def release(self, lease: Lease) -> None:
        with self._lock:
            self.writes += 1
            entry = self._leases.get(lease.key)
            if entry is not None and entry.owner == lease.owner and entry.fence == lease.fence:
                entry.owner = None

    def live(self, prefix: str) -> dict[str, Owner]:
        with self._lock:
            now = self._clock()
            return {
                key: entry.owner
                for key, entry in self._leases.items()
                if key.startswith(prefix) and entry.owner is not None and entry.expires > now
            }

    def forget(self, prefix: str, expired_for: float) -> int:
        with self._lock:
            horizon = self._clock() - expired_for
            gone = [k for k, e in self._leases.items() if k.startswith(prefix) and e.expires <= horizon]
            for key in gone:
                del self._leases[key]
            return len(gone)

    def fence(self, key: str) -> int:
        with self._lock:
            entry = self._leases.get(key)
            return entry.fence if entry is not None else 0

    def join_group(self, config: GroupConfig) -> GroupConfig:
        with self._lock:
            stored = self._groups.setdefault(config.document_key, config)
        problem = mismatch(stored, config)
        if problem is not None:
            raise problem
        return stored
