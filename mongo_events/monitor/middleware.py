"""The monitor middleware: records each delivery's lifecycle, written in batches by the flusher."""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import datetime, timedelta
from typing import Any

import attrs

from ..delivery import Delivery
from ..errors import StoreError
from ..flusher import time_left
from ..middleware.base import Middleware
from .records import MonitorEntry, MonitorStatus, now_ms
from .store import MonitorStore

__all__ = ["MonitorMiddleware"]

log = logging.getLogger(__name__)

#: Seconds a replay's write waits for a flush's store write before leaving its entry to the
#: next flush. A flush never waits this long: see :meth:`MonitorMiddleware.flush`.
WRITE_WAIT = 5.0


def _span_ids() -> tuple[str | None, str | None]:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - the otel extra is optional
        return None, None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None, None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


def _elapsed(entry: MonitorEntry, now: datetime) -> None:
    """``duration_ms`` from ``started_at`` to ``now`` (both in whole milliseconds, as stored), so
    that it always equals ``completed_at - started_at`` once the entry is finished."""
    entry.duration_ms = (now - entry.started_at) / timedelta(milliseconds=1)


class MonitorMiddleware(Middleware):
    """Records pending → retrying → completed / failed per (event, subscription).

    Pass a store as ``Bus(monitor=store)`` (the bus builds this middleware, runs it
    outermost and writes its batches from the flusher thread), or build it yourself
    for options. Monitoring is best effort: a failed write is logged and retried with
    the next batch; past ``max_buffered`` unwritten entries the oldest are dropped,
    counted in :attr:`dropped`, and logged. Events themselves are never affected.

    :param store: where entries go.
    :param instance_id: this process in entries (default ``"<host>:<pid>"``).
    :param max_buffered: most entries held while the store cannot be written.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self, store: MonitorStore, *, instance_id: str | None = None, max_buffered: int = 100_000
    ) -> None:
        self.store = store
        self._instance_id = instance_id
        self.max_buffered = max_buffered
        self._active: dict[tuple[str, str], MonitorEntry] = {}
        self._dirty: dict[tuple[str, str], MonitorEntry] = {}
        self._lock = threading.Lock()
        # Held from taking entries to the end of their write (and the putting back of a failed
        # batch), so that writes land in the order their contents were taken. Without it a flush
        # that took a replay's pending entry could land after the replay's own completed write,
        # or put its copy back after a failure, and the entry stayed pending for good. Taken
        # before _lock; the delivery hooks take only _lock, so no worker waits for the store.
        self._write_lock = threading.Lock()
        self.dropped = 0
        #: Batch writes so far (for tests and the benchmark).
        self.writes = 0

    @property
    def instance_id(self) -> str:
        # Computed lazily so that a middleware built before a fork names the child.
        return self._instance_id or f"{socket.gethostname()}:{os.getpid()}"

    def before_delivery(self, delivery: Delivery) -> None:
        key = (delivery.event_id, delivery.subscription)
        trace_id, span_id = _span_ids()
        with self._lock:
            entry = self._active.get(key)
            if entry is None:
                event = delivery.event
                metadata: dict[str, Any] = {
                    "operation": str(event.operation_type),
                    "document_key": event.document_key,
                }
                if delivery.replay:
                    metadata["replay"] = True
                entry = MonitorEntry(
                    event_id=delivery.event_id,
                    subscription_id=delivery.subscription,
                    event_name=event.namespace,
                    bus_id=delivery.bus,
                    status=MonitorStatus.PENDING if delivery.attempt == 1 else MonitorStatus.RETRYING,
                    started_at=now_ms(),
                    instance_id=self.instance_id,
                    trace_id=trace_id,
                    span_id=span_id,
                    metadata=metadata,
                )
                self._active[key] = entry
            entry.retry_count = delivery.attempt - 1
            if delivery.attempt > 1:
                entry.status = MonitorStatus.RETRYING
            self._dirty[key] = entry

    def after_delivery(self, delivery: Delivery, error: BaseException | None, duration: float) -> None:
        key = (delivery.event_id, delivery.subscription)
        with self._lock:
            entry = self._active.get(key)
            if entry is None:
                return
            now = now_ms()
            _elapsed(entry, now)
            if error is not None:
                entry.error = _error_text(error)
            if error is None or delivery.replay:  # a replay is one attempt: it completes or fails
                entry.status = MonitorStatus.COMPLETED if error is None else MonitorStatus.FAILED
                entry.completed_at = now
                del self._active[key]
            else:
                entry.status = MonitorStatus.RETRYING
            self._dirty[key] = entry
        if delivery.replay:
            self._write_now(entry)

    def _failed(self, delivery: Delivery, error: BaseException) -> None:
        key = (delivery.event_id, delivery.subscription)
        with self._lock:
            entry = self._active.pop(key, None)
            if entry is None:
                return
            entry.status = MonitorStatus.FAILED
            entry.error = _error_text(error)
            entry.completed_at = now_ms()
            _elapsed(entry, entry.completed_at)
            self._dirty[key] = entry

    def after_dead_letter(self, delivery: Delivery, error: BaseException) -> None:
        self._failed(delivery, error)

    def after_skip(self, delivery: Delivery, error: BaseException) -> None:
        self._failed(delivery, error)

    def after_give_up(self, delivery: Delivery, error: BaseException) -> None:
        self._failed(delivery, error)

    def _write_now(self, entry: MonitorEntry) -> None:
        """Replays run outside a bus's flusher: write their entry at once (best effort).

        It waits up to :data:`WRITE_WAIT` for a batch being written (see ``_write_lock``);
        after that the entry is left to the next flush. Only the replay's caller waits, never
        a bus's workers.
        """
        if not self._write_lock.acquire(timeout=WRITE_WAIT):
            with self._lock:  # a newer state of the key marked meanwhile wins
                self._dirty.setdefault(entry.key, attrs.evolve(entry, metadata=dict(entry.metadata)))
            log.warning(
                "monitor: a batch write still runs after %.0fs; the replay of %s for %r is recorded at the next flush",
                WRITE_WAIT,
                entry.event_id,
                entry.subscription_id,
            )
            return
        try:
            with self._lock:
                self._dirty.pop(entry.key, None)
                snapshot = attrs.evolve(entry, metadata=dict(entry.metadata))
            try:
                self.store.write([snapshot])
            except Exception as exc:
                log.warning(
                    "monitor: could not record replay of %s for %r: %s",
                    entry.event_id,
                    entry.subscription_id,
                    exc,
                )
        finally:
            self._write_lock.release()

    def flush(self) -> None:
        """Write every changed entry in one batch (the bus's flusher calls this).

        While a replay's write runs, the flusher's regular flush skips its turn (the entries
        wait for the next one: it holds the flusher, and the checkpoint writes, otherwise),
        and a bounded flush (a stop's final one) waits at most what its deadline has left.

        :raises StoreError: the write failed, or a bounded flush's time ran out waiting for a
            replay's write: the entries wait for the next flush.
        """
        left = time_left()
        if left is None:
            if not self._write_lock.acquire(blocking=False):
                return
        elif not self._write_lock.acquire(timeout=left):
            raise StoreError("monitor entries not written: a replay's write to the store was still running")
        try:
            with self._lock:
                if not self._dirty:
                    return
                batch = {k: attrs.evolve(e, metadata=dict(e.metadata)) for k, e in self._dirty.items()}
                self._dirty.clear()
            try:
                self.store.write(list(batch.values()))
            except Exception:
                with self._lock:
                    for key, entry in batch.items():
                        # What was marked since is newer (a delivery hook, or a replay that
                        # gave up waiting for this write): it wins.
                        self._dirty.setdefault(key, entry)
                    excess = len(self._dirty) - self.max_buffered
                    if excess > 0:
                        for key in list(self._dirty)[:excess]:
                            del self._dirty[key]
                        self.dropped += excess
                        log.error(
                            "monitor: store unavailable; dropped %d unwritten entries (%d so far)",
                            excess,
                            self.dropped,
                        )
                raise
            self.writes += 1
        finally:
            self._write_lock.release()
