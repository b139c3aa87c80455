"""Checkpointing: what the flusher writes for one stream, acks first, then the checkpoint.

One snapshot of the ack records and the checkpoint is taken under the window's lock,
then written outside it: the ack batch first, the checkpoint after. So every event the
written checkpoint covers has its ack record stored before it: a crash between the two
writes leaves acks ahead of the checkpoint (harmless), never behind it.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from bson.timestamp import Timestamp

from .health import token_time
from .stores.base import AckStore, ResumeTokenStore
from .stores.records import AckRecord
from .window import Window

__all__ = ["IDLE_CHECKPOINT_INTERVAL", "Checkpointer", "checkpoint_seconds"]

#: An idle stream's post-batch token is written at most this often (events move it every flush).
IDLE_CHECKPOINT_INTERVAL = 10.0


class _Checkpoint(NamedTuple):
    """A checkpoint taken for writing: what the store gets, and what to book once it is stored."""

    token: Any
    cluster_time: Any
    version: int  # the tracker's version it was taken at
    covered: int  # events it stores past the previous stored checkpoint
    moved_by_events: bool  # finished events moved it (not only an idle post-batch token)


class Checkpointer:
    """Writes one stream's ack records and checkpoint (its :meth:`flush` is a flusher task).

    :param window: the stream's window, whose lock guards the snapshot.
    :param token_store: where the checkpoint goes (``None``: ``resume=False``).
    :param key: the checkpoint key.
    :param namespace: what the stream watches, stored beside the checkpoint when the store
        takes it (``level`` too).
    :param on_store_error: ``fn(error, what)`` for a failed write (the bus logs, records
        and reports it); the write is retried at the next flush.
    """

    def __init__(
        self,
        window: Window,
        token_store: ResumeTokenStore | None,
        ack_store: AckStore | None,
        *,
        key: str,
        namespace: str,
        level: str,
        stop_event: threading.Event,
        on_store_error: Callable[[BaseException, str], None],
    ) -> None:
        self._window = window
        self.token_store = token_store
        self.ack_store = ack_store
        self.key = key
        self._stop = stop_event
        self._on_store_error = on_store_error
        #: Stores written against the older three-argument save() do not get namespace/level.
        self._save_kwargs: dict[str, str] = (
            {"namespace": namespace, "level": level}
            if token_store is not None and _takes_namespace(token_store)
            else {}
        )
        self._saved_version = 0
        self._last_save = 0.0
        #: Cluster time (s) of the stored checkpoint.
        self.persisted_time: int | None = None
        #: Number of resume-token writes (for tests and the benchmark).
        self.token_writes = 0
        #: Number of ack-store batch writes (for tests and the benchmark).
        self.ack_writes = 0

    def loaded(self, cluster_time: Any, token: Any) -> None:
        """The stream resumes after this stored checkpoint."""
        self.persisted_time = checkpoint_seconds(cluster_time, token)

    def save_opening(self, token: Mapping[str, Any]) -> None:
        """Store where a first-ever stream opened (raises the store's error)."""
        assert self.token_store is not None
        self.token_store.save(self.key, token, None, **self._save_kwargs)
        self.token_writes += 1
        self.persisted_time = token_time(token)
        window = self._window
        with window.mutex:
            window.tracker.note_resume_token(token)
            self._saved_version = window.tracker.version

    def flush(self) -> None:
        """Write ack records, then the checkpoint, both taken in one snapshot."""
        try:
            self._flush()
        finally:
            self._window.flush_ended()

    def _flush(self) -> None:
        window = self._window
        with window.cond:
            checkpoint = self._checkpoint_to_write()
            acks = window.acks
            if acks:
                window.acks = {}
        try:
            if acks:
                self._write_acks(acks)
            if checkpoint is not None:
                self._write_checkpoint(checkpoint)
        except Exception:
            if checkpoint is not None:  # not stored: the next flush writes it
                with window.cond:
                    window.tracker.moved_by_events = (
                        window.tracker.moved_by_events or checkpoint.moved_by_events
                    )
            raise

    def _write_acks(self, batch: dict[str, AckRecord]) -> None:
        store = self.ack_store
        assert store is not None
        try:
            store.write(list(batch.values()))
        except Exception as exc:
            self._on_store_error(exc, f"write {len(batch)} ack record(s)")
            window = self._window
            with window.cond:  # put them back; anything newer for the same event wins
                batch.update(window.acks or {})
                window.acks = batch
            raise
        self.ack_writes += 1

    def _checkpoint_to_write(self) -> _Checkpoint | None:
        """The checkpoint a flush should write now, or None (caller holds the window's lock)."""
        self._window.drain()
        if self.token_store is None:
            return None
        tracker = self._window.tracker
        if tracker.version == self._saved_version or tracker.checkpoint is None:
            return None
        by_events = tracker.moved_by_events
        if (
            not by_events
            and time.monotonic() - self._last_save < IDLE_CHECKPOINT_INTERVAL
            and not self._stop.is_set()
        ):
            return None  # only the idle post-batch token moved: write it now and then, not every flush
        tracker.moved_by_events = False
        return _Checkpoint(
            tracker.checkpoint, tracker.checkpoint_time, tracker.version, tracker.unflushed, by_events
        )

    def _write_checkpoint(self, checkpoint: _Checkpoint) -> None:
        store = self.token_store
        assert store is not None
        token, cluster_time = checkpoint.token, checkpoint.cluster_time
        try:
            store.save(self.key, token, cluster_time, **self._save_kwargs)
        except Exception as exc:
            self._on_store_error(exc, "write checkpoint")
            raise
        self._saved_version = checkpoint.version
        self._last_save = time.monotonic()
        self.persisted_time = checkpoint_seconds(cluster_time, token)
        self.token_writes += 1
        window = self._window
        with window.cond:
            window.tracker.persisted(checkpoint.covered)
            window.cond.notify_all()


def checkpoint_seconds(cluster_time: Any, token: Any) -> int | None:
    """Seconds of the time inside a checkpoint's token, else of its cluster time.

    The token comes first: an idle post-batch token is stored with the cluster time of
    the last *event*, which on a quiet stream can be days old while the token is fresh.
    """
    seconds = token_time(token)
    if seconds is not None:
        return seconds
    return cluster_time.time if isinstance(cluster_time, Timestamp) else None


def _takes_namespace(store: ResumeTokenStore) -> bool:
    try:
        params = inspect.signature(store.save).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "namespace" or p.kind is p.VAR_KEYWORD for p in params)
