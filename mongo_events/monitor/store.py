"""The monitor store contract, and its in-memory implementation."""

from __future__ import annotations

import abc
import builtins
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

import attrs

from .records import (
    MonitorEntry,
    MonitorFilter,
    MonitorPage,
    MonitorStatus,
    MonitorSummary,
    decode_cursor,
    encode_cursor,
    summarize,
)

__all__ = ["MonitorStore", "MemoryMonitorStore"]


def summary_range(filter: MonitorFilter) -> MonitorFilter:
    """A summary without a time range covers the last 24 hours."""
    if filter.start_time is None and filter.end_time is None:
        return attrs.evolve(filter, start_time=datetime.now(timezone.utc) - timedelta(hours=24))
    return filter


class MonitorStore(abc.ABC):
    """Keeps one :class:`MonitorEntry` per (event, subscription).

    The bus writes through :meth:`write` from its flusher thread, one batch per
    flush; the rest serve the HTTP API and diagnosis. Methods raise
    :class:`mongo_events.StoreError` when the backend fails.

    .. versionadded:: 0.1.0
    """

    @abc.abstractmethod
    def write(self, entries: Sequence[MonitorEntry]) -> None:
        """Upsert a batch of entries by (event_id, subscription_id)."""

    @abc.abstractmethod
    def get(self, event_id: str, subscription_id: str) -> MonitorEntry | None:
        """One entry, or ``None``."""

    def get_by_event_id(self, event_id: str) -> builtins.list[MonitorEntry]:
        """Every subscription's entry for one event."""
        return self.list(MonitorFilter(event_id=event_id, limit=1000)).entries

    @abc.abstractmethod
    def list(self, filter: MonitorFilter = MonitorFilter()) -> MonitorPage:  # noqa: B008
        """A page of entries ordered by (started_at, event_id, subscription_id)."""

    @abc.abstractmethod
    def count(self, filter: MonitorFilter = MonitorFilter()) -> int:  # noqa: B008
        """How many entries match (cursor and limit are ignored)."""

    @abc.abstractmethod
    def summary(self, filter: MonitorFilter = MonitorFilter()) -> MonitorSummary:  # noqa: B008
        """Totals by status, event name and instance (default: the last 24 hours)."""

    def stuck_pending(self, older_than: timedelta, limit: int = 10) -> builtins.list[MonitorEntry]:
        """Entries still pending that started more than ``older_than`` ago, oldest first."""
        cutoff = datetime.now(timezone.utc) - older_than
        return self.list(
            MonitorFilter(statuses=[MonitorStatus.PENDING], end_time=cutoff, limit=limit)
        ).entries

    def stuck_pending_count(self, older_than: timedelta) -> int:
        cutoff = datetime.now(timezone.utc) - older_than
        return self.count(MonitorFilter(statuses=[MonitorStatus.PENDING], end_time=cutoff))

    @abc.abstractmethod
    def delete_older_than(self, age: timedelta) -> int:
        """Delete entries that started more than ``age`` ago; returns how many."""

    def ensure_indexes(self) -> None:  # noqa: B027
        """Create the indexes the store needs (called by ``Bus.start()``)."""

    def close(self) -> None:  # noqa: B027
        """Release resources."""


class MemoryMonitorStore(MonitorStore):
    """Entries in a dict: for tests and single-process use.

    .. versionadded:: 0.1.0
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], MonitorEntry] = {}
        self._lock = threading.Lock()

    def write(self, entries: Sequence[MonitorEntry]) -> None:
        with self._lock:
            for entry in entries:
                self._entries[entry.key] = attrs.evolve(entry, metadata=dict(entry.metadata))

    def get(self, event_id: str, subscription_id: str) -> MonitorEntry | None:
        with self._lock:
            return self._entries.get((event_id, subscription_id))

    def _matching(self, filter: MonitorFilter) -> builtins.list[MonitorEntry]:
        with self._lock:
            found = [e for e in self._entries.values() if filter.matches(e)]
        found.sort(key=lambda e: (e.started_at, e.event_id, e.subscription_id), reverse=filter.order_desc)
        return found

    def list(self, filter: MonitorFilter = MonitorFilter()) -> MonitorPage:  # noqa: B008
        found = self._matching(filter)
        if filter.cursor:
            after = decode_cursor(filter.cursor)
            if filter.order_desc:
                found = [e for e in found if (e.started_at, e.event_id, e.subscription_id) < after]
            else:
                found = [e for e in found if (e.started_at, e.event_id, e.subscription_id) > after]
        limit = filter.effective_limit
        page = found[:limit]
        more = len(found) > limit
        return MonitorPage(page, encode_cursor(page[-1]) if more and page else None, more)

    def count(self, filter: MonitorFilter = MonitorFilter()) -> int:  # noqa: B008
        return len(self._matching(filter))

    def summary(self, filter: MonitorFilter = MonitorFilter()) -> MonitorSummary:  # noqa: B008
        found = self._matching(summary_range(filter))
        rows = [
            (
                e.event_name,
                e.status.value,
                e.instance_id,
                1,
                e.duration_ms or 0.0,
                int(e.duration_ms is not None),
            )
            for e in found
        ]
        times = [e.started_at for e in found]
        return summarize(rows, min(times, default=None), max(times, default=None))

    def delete_older_than(self, age: timedelta) -> int:
        cutoff = datetime.now(timezone.utc) - age
        with self._lock:
            old = [k for k, e in self._entries.items() if e.started_at < cutoff]
            for key in old:
                del self._entries[key]
        return len(old)
