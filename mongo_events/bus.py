"""The bus: the facade over one stream consumer, its subscriptions and their lifecycle.

The bus holds its options (:mod:`mongo_events.bus_options`, checked once at
construction), ``subscribe``, the state machine (``start``/``stop``/``run_forever``/``join``,
signals) and the public queries, each handed in one line to the current run
(:mod:`mongo_events.run`: one stream consumer, or a consumer group's partitions, with the
worker pool and the flusher, its stop events and its shutdown sequence). It holds no
per-event logic: the stream consumer (:mod:`mongo_events.consumer`) owns the watcher, the
window and the checkpoint writing; :mod:`mongo_events.lifecycle` stops the parts in order;
:mod:`mongo_events.health` assembles ``health()``. See README.rst, "Architecture".
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from types import FrameType, TracebackType
from typing import Any, Literal, TypeVar, overload

from bson.timestamp import Timestamp
from pymongo import MongoClient
from pymongo.collection import Collection as MongoCollection
from pymongo.database import Database

from .bus_options import (
    BusOptionAttributes,
    BusOptions,
    HistoryLostPolicy,
    Ordering,
    as_idempotency,
    check_payload,
)
from .consumer import StreamConsumer
from .deadlettering import dead_letter_hook
from .deadlettering import replay as replay_letter
from .decoding import Decoder
from .dispatch import DeadLetterHook, Dispatcher
from .errors import BusStateError, ConfigurationError, ShutdownTimeout, ThreadFailed
from .events import FullDocument, OperationType
from .groups.member import partition_key
from .guard import describe
from .health import DeadLetterWatch, Health
from .idempotency.base import IdempotencyStore
from .idempotency.guard import Idempotency
from .lifecycle import FINAL_FLUSH_MIN, check_threads_run, request_snapshot, reset_positions, rewind_positions
from .metrics import Metrics
from .middleware.base import Middleware
from .monitor.middleware import MonitorMiddleware
from .monitor.status import ConsumerStatusStore, StatusPublisher
from .monitor.store import MonitorStore
from .reporting import ErrorContext, ErrorHandler, ErrorKindName, report_error
from .retrying import RetryBackoff
from .run import BusRun, RunLink, new_run
from .runner import ensure_logging
from .stores.base import AckStore, DeadLetterStore, ResumeTokenStore
from .stores.records import DeadLetter
from .subscription import OnExhausted, Subscription
from .watcher import Position

__all__ = ["FINAL_FLUSH_MIN", "Bus", "BusState", "HistoryLostPolicy", "Ordering"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: Seconds of failing dead-letter writes after which ``health()`` says ``unhealthy``.
DEAD_LETTER_STALL = 60.0


class BusState(str, enum.Enum):
    """Lifecycle states of a :class:`Bus`."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Bus(BusOptionAttributes):
    """Delivers the changes of one change stream to subscribed callbacks, at least once.

    :param target: a pymongo ``Collection`` (collection watch), ``Database`` (database
        watch) or ``MongoClient`` (cluster watch).
    :param name: the bus's name in logs, thread names and metrics (default: the namespace).
    :param full_document: the stream's ``fullDocument`` option (:class:`FullDocument`).
    :param full_document_before_change: ``"whenAvailable"`` or ``"required"`` for pre-images.
    :param full_document_only: callbacks get the full document (or, for deletes, the
        document key) instead of the event; needs a ``full_document`` other than default.
    :param update_description: put the update description on each :class:`Delivery`.
    :param include_empty_updates: deliver updates that changed no field (skipped by default).
    :param max_updated_fields_size: drop ``updated_fields`` larger than this many BSON bytes
        (``UpdateDescription.updated_fields_dropped`` tells the callback); needs a
        ``full_document`` other than default; implies ``update_description``.
    :param pipeline: aggregation stages appended after ``$changeStream``.
    :param batch_size: most changes per server batch (``getMore``); default 1000. It bounds
        the changes pymongo holds decoded outside the window (the server's own limit is 16 MiB
        a batch: 16,000 changes of 1 KB) at one round trip per 1,000 changes while catching
        up; ``None`` leaves it to the server. See the README's performance section.
    :param max_await_time: how long one ``getMore`` waits for changes, in seconds (default 1);
        also how long ``stop()`` may wait for the watcher.
    :param show_expanded_events: ask for expanded events (MongoDB 6.0+).
    :param resume: ``False`` starts from now on every start and stores no position.
    :param resume_token_store: where the checkpoint lives (default: ``_event_resume_tokens``
        in the watched database, ``admin`` for a cluster watch).
    :param resume_token_collection: a collection (or a collection name in the watched
        database) for the default MongoDB store.
    :param resume_token_id: suffix of :attr:`resume_token_key` (default: the host name);
        give each independent consumer its own.
    :param start_from_past: when no checkpoint exists, start this far in the past (a
        ``timedelta``), or ``"all"`` to start at the oldest entry still in the oplog
        (Go's ``WithStartFromPast(0)``). A start older than the oplog fails with
        :class:`ResumeTokenLost` saying so. See :meth:`rewind` to go back once.
    :param max_workers: worker threads running callbacks.
    :param max_in_flight: most events held after the checkpoint, finished or not. It bounds
        memory and redelivery after a crash; at full speed the checkpoint (and the ack
        store) is written about once per this many events.
    :param ordering: ``"document"`` (per-document order, default; events without a document
        key, such as ``drop``, are barriers), ``"stream"`` (one at a time per subscription)
        or ``"none"``.
    :param flush_interval: seconds between checkpoint writes.
    :param decoder: turns documents into payload types (default: cattrs on ``cattrs.preconf.bson``).
    :param middleware: hooks around each delivery attempt.
    :param dead_letters: a :class:`DeadLetterStore` (or any ``fn(event, subscription, error,
        attempts)``) that receives events whose retries ran out, rejected or undecodable ones.
    :param ack_store: records each delivered event as pending when received and acked
        when every subscription is done, in batches written by the flusher.
    :param on_history_lost: ``"raise"`` (default: stop with :class:`ResumeTokenLost`) or
        ``"restart_from_now"`` (skip the gap, call ``history_lost_callback``, log, go on).
    :param history_lost_callback: ``fn(key, since)`` called when a gap is skipped.
    :param start_timeout: how long ``start()`` waits for the first stream to open, to
        fail fast on a standalone server, bad credentials or a bad pipeline.
    :param metrics: a :class:`mongo_events.Metrics` recording OpenTelemetry instruments.
    :param monitor: a :class:`mongo_events.monitor.MonitorStore` (or a configured
        :class:`~mongo_events.monitor.MonitorMiddleware`): one entry per event and
        subscription, written in batches by the flusher.
    :param on_error: ``fn(error, context)`` called with every stream error, failed
        callback attempt, store failure and dead-letter failure, next to logging, health
        and metrics (:class:`mongo_events.ErrorContext` says what failed); what it raises
        is logged and ignored. The counterpart of Go's ``WithErrorHandler``.
    :param status: a :class:`mongo_events.monitor.ConsumerStatusStore` (or a configured
        :class:`~mongo_events.monitor.StatusPublisher`): the bus publishes its status there
        every few seconds and at stop, for dashboards in other processes.
    :param idempotency: an :class:`IdempotencyStore` (or a configured :class:`Idempotency`)
        for every subscription that does not pass its own: each event's key is claimed
        before the callback and completed after it succeeded (see "Exactly-once effects").
    :param crash_store: an :class:`IdempotencyStore` where subscriptions without
        ``idempotency`` count each event's starts (two round trips per delivery), so that
        an event that crashed the process 3 times is dead-lettered (see "Poison events").
    :param snapshot: ``"initial"``: on a start without a checkpoint, deliver every existing
        document as a ``snapshot`` event first, then stream from where the snapshot began;
        ``"always"``: at every start; ``None`` (default): never (see :meth:`snapshot`).
        An interrupted snapshot continues after its last finished ``_id``.
    :param snapshot_collections: what a database bus (names) or cluster bus (``db.coll``,
        required there) snapshots; default: every collection of the database.
    :param snapshot_filter: a query: only matching documents are snapshotted.
    :param snapshot_batch_size: documents read per query (default 1000).
    :param coalesce: ``True``: of the events of one document waiting in its lane, deliver only
        the newest per subscription (Go's ``CoalesceByDocumentKey``; see "Coalescing"). Needs
        ``ordering="document"``.
    :param group: a consumer group's name: buses with the same group and target share the
        work, each change handled by one member (see "Running several consumers"). ``None``
        (the default): this bus consumes every change. Needs checkpoints in MongoDB.
    :param partitions: with a group, split the stream into this many partitions by a hash of
        the document key (each with its own checkpoint ``<group>:<namespace>#<p>``, lease and
        stream), shared evenly among the live members. ``1`` (the default): active/standby.
    :param lease_ttl: seconds a member's partition lease lives unrenewed (default 10): a dead
        member's partitions are taken over within about this long; renewed every third of it.

    :ivar options: the validated options (:class:`~mongo_events.bus_options.BusOptions`);
        each option is also an attribute of the bus (``bus.max_workers``, and
        ``bus.snapshot_mode`` for ``snapshot``).

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        target: MongoCollection[Any] | Database[Any] | MongoClient[Any],
        *,
        name: str | None = None,
        full_document: FullDocument | str | None = None,
        full_document_before_change: str | None = None,
        full_document_only: bool = False,
        update_description: bool = False,
        include_empty_updates: bool = False,
        max_updated_fields_size: int = 0,
        pipeline: Sequence[Mapping[str, Any]] | None = None,
        batch_size: int | None = 1000,
        max_await_time: float | timedelta = 1.0,
        show_expanded_events: bool = False,
        resume: bool = True,
        resume_token_store: ResumeTokenStore | None = None,
        resume_token_collection: MongoCollection[Any] | str | None = None,
        resume_token_id: str | None = None,
        start_from_past: timedelta | Literal["all"] | None = None,
        max_workers: int = 8,
        max_in_flight: int = 2000,
        ordering: Ordering = "document",
        flush_interval: float = 1.0,
        decoder: Decoder | None = None,
        middleware: Sequence[Middleware] = (),
        dead_letters: DeadLetterStore | DeadLetterHook | None = None,
        ack_store: AckStore | None = None,
        on_history_lost: HistoryLostPolicy = "raise",
        history_lost_callback: Callable[[str, Timestamp | None], None] | None = None,
        start_timeout: float = 10.0,
        metrics: Metrics | None = None,
        monitor: MonitorStore | MonitorMiddleware | None = None,
        on_error: ErrorHandler | None = None,
        status: ConsumerStatusStore | StatusPublisher | None = None,
        idempotency: IdempotencyStore | Idempotency | None = None,
        crash_store: IdempotencyStore | None = None,
        snapshot: Literal["initial", "always"] | None = None,
        snapshot_collections: Sequence[str] | None = None,
        snapshot_filter: Mapping[str, Any] | None = None,
        snapshot_batch_size: int = 1000,
        coalesce: bool = False,
        group: str | None = None,
        partitions: int = 1,
        lease_ttl: float = 10.0,
    ) -> None:
        # Every keyword by name: BusOptions has a field for each (tests/test_bus_options.py).
        given = {key: value for key, value in locals().items() if key != "self"}
        self.options = BusOptions.build(target, given)
        self._subscriptions: list[Subscription] = []
        self._state = BusState.NEW
        self._state_lock = threading.Lock()
        self._error: BaseException | None = None
        self._pid = os.getpid()
        self._dead_letter_watch = DeadLetterWatch(self._note_error)
        self._dead_letters = dead_letter_hook(
            self.options.dead_letters,
            bus_name=self.name,
            resume_token_key=self.resume_token_key,
            on_error=self.on_error,
            on_outcome=self._dead_letter_watch.outcome,
        )
        self._signals = 0
        self._run = self._new_run()

    def _new_run(self) -> BusRun:
        """The parts of one run (made at construction and at each start): see :mod:`mongo_events.run`."""
        link = RunLink(
            self.options,
            self._subscriptions,
            self._dead_letters,
            self._fail,
            self._report,
            self._initial_position,  # read at each start: the benchmark's seam
            observe=lambda: self.metrics.attach(self) if self.metrics is not None else None,
            unobserve=lambda: self.metrics.detach(self) if self.metrics is not None else None,
            publish=lambda: self.status.attach(self) if self.status is not None else None,
        )
        return new_run(link)

    # -- properties ---------------------------------------------------------------

    @property
    def resume_token_key(self) -> str:
        """``"<db.coll | db.* | *.*>:<resume_token_id>"``, the seed's key format."""
        return self.options.resume_token_key

    @property
    def checkpoint_keys(self) -> list[str]:
        """Where this bus's positions are stored: :attr:`resume_token_key`, or with a group one key
        per partition (``"<group>:<namespace>#<p>"``), which ``reset_resume_token()``, ``rewind()``
        and ``snapshot()`` act on (stop every member of the group first).

        .. versionadded:: 0.2.0
        """
        if self.group is None:
            return [self.resume_token_key]
        return [partition_key(self.group, self.namespace, p) for p in range(self.partitions)]

    @property
    def checkpoint_key_summary(self) -> str:
        """:attr:`checkpoint_keys` in one string, for logs and status: :attr:`resume_token_key`,
        or with a group its partitions' keys as a range (``"g:shop.orders#0..3"``).

        .. versionadded:: 0.2.0
        """
        keys = self.checkpoint_keys
        return keys[0] if len(keys) == 1 else f"{keys[0]}..{self.partitions - 1}"

    @property
    def namespace(self) -> str:
        """What is watched: ``db.coll``, ``db.*`` or ``*.*``."""
        return self.options.namespace

    @property
    def state(self) -> BusState:
        return self._state

    @property
    def error(self) -> BaseException | None:
        """Why the bus failed, when :attr:`state` is ``FAILED``."""
        return self._error

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        return tuple(self._subscriptions)

    @property
    def checkpoint(self) -> Mapping[str, Any] | None:
        """The in-memory checkpoint: the token the flusher writes next (``None`` with a group:
        each partition has its own, see :attr:`checkpoint_keys`)."""
        return self._consumer.window.checkpoint()  # type: ignore[return-value]

    @property
    def in_flight(self) -> int:
        """Events held after the checkpoint, finished or not (at most ``max_in_flight`` per partition)."""
        return self._run.in_flight()

    @property
    def _consumer(self) -> StreamConsumer:
        """The run's stream consumer (idle with a group); tests reach in."""
        return self._run.consumer

    @property
    def _dispatcher(self) -> Dispatcher | None:
        return self._run.dispatcher

    # Counters of the stream consumer (read by tests, the benchmark and dashboards).

    @property
    def token_writes(self) -> int:
        """Resume-token writes since start."""
        return self._consumer.checkpointer.token_writes

    @property
    def ack_writes(self) -> int:
        """Ack-store batch writes since start."""
        return self._consumer.checkpointer.ack_writes

    @property
    def reconnections(self) -> int:
        """Streams reopened since start (errors, invalidations, lost history)."""
        return self._consumer.reconnections

    @property
    def history_gaps(self) -> int:
        """Gaps skipped with ``on_history_lost="restart_from_now"`` since start."""
        return self._consumer.history_gaps

    @property
    def oversize_events(self) -> int:
        """Events over 16 MB dead-lettered as stubs since start."""
        return self._consumer.oversize_events

    @property
    def missing_documents(self) -> int:
        """Updates that ``full_document_only`` subscriptions skipped: their document was gone."""
        return self._consumer.missing_documents

    @property
    def coalesced(self) -> int:
        """Events replaced by a newer event of their document before delivery (``coalesce=True``)."""
        return self._consumer.coalesced

    # -- subscriptions --------------------------------------------------------------

    @overload
    def subscribe(self, callback: F, /) -> F: ...

    @overload
    def subscribe(
        self,
        callback: None = None,
        /,
        *,
        payload: Any = None,
        operations: Collection[str | OperationType] | None = None,
        name: str | None = None,
        max_retries: int = 5,
        retry_backoff: RetryBackoff | None = None,
        on_exhausted: OnExhausted = "stop",
        idempotency: IdempotencyStore | Idempotency | None = None,
    ) -> Callable[[F], F]: ...

    def subscribe(
        self,
        callback: Callable[..., Any] | None = None,
        /,
        *,
        payload: Any = None,
        operations: Collection[str | OperationType] | None = None,
        name: str | None = None,
        max_retries: int = 5,
        retry_backoff: RetryBackoff | None = None,
        on_exhausted: OnExhausted = "stop",
        idempotency: IdempotencyStore | Idempotency | None = None,
    ) -> Any:
        """Register a callback; use as ``bus.subscribe(fn)`` or ``@bus.subscribe(...)``.

        The callback takes ``(event)`` or ``(event, delivery)``. ``event`` is the
        :class:`ChangeEvent`, or with ``payload=T`` the event (with
        ``full_document_only``: the document) decoded into ``T``.

        :param payload: a dataclass, attrs class, ``TypedDict`` or ``dict`` to decode into.
        :param operations: operation types to receive (default: all; with ``payload``:
            insert, update, replace, delete). Others count as done at once.
        :param name: unique name (default: the callback's qualified name).
        :param max_retries: retries after the first attempt before giving up.
        :param retry_backoff: delays between retries (default 0.1 s doubling to 30 s, jittered).
        :param on_exhausted: without a dead-letter store, ``"stop"`` the bus (default) or ``"skip"``.
        :param idempotency: an :class:`IdempotencyStore` or :class:`Idempotency` (default: the
            bus's): a redelivered event whose key was completed is skipped as a duplicate.
        :raises BusStateError: when the bus has already started.
        :raises ConfigurationError: for a duplicate name, a callback of the wrong shape, or an
            option that cannot work (unknown ``operations``, a ``payload`` type the decoder's
            cattrs converter cannot structure, a bad ``max_retries`` ...), naming the option.
        """

        def register(fn: F) -> F:
            self._check_pid()
            if self._state not in (BusState.NEW, BusState.STOPPED, BusState.FAILED):
                raise BusStateError("subscribe() before start(): this bus is already running")
            sub = Subscription(
                fn,
                name=name,
                payload=payload,
                operations=operations,
                max_retries=max_retries,
                retry_backoff=retry_backoff,
                on_exhausted=on_exhausted,
                full_document_only=self.full_document_only,
                index=len(self._subscriptions),
                show_expanded_events=self.show_expanded_events,
                idempotency=as_idempotency(idempotency) or self.idempotency or self.options.crash_counter,
            )
            if payload is not None:
                check_payload(self.options.decoder, payload)
            if any(s.name == sub.name for s in self._subscriptions):
                raise ConfigurationError(
                    f"a subscription named {sub.name!r} already exists on bus {self.name!r}; pass name=..."
                )
            self._subscriptions.append(sub)
            return fn

        if callback is not None:
            return register(callback)
        return register

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> Bus:
        """Start watching in background threads; returns at once the stream has opened.

        Waits up to ``start_timeout`` for the first stream so that a standalone server,
        bad credentials, an invalid pipeline or an unreadable checkpoint fail here.
        If the server is merely unreachable, the watcher keeps retrying in the background,
        loudly: ERROR lines at each retry and ``health()`` ``unhealthy`` until the stream
        opens. A ``start()`` that raises leaves the bus ``FAILED`` with :attr:`error` set
        (its threads ended); a new, stopped or failed bus can be started. Only when the
        failure came after the stream opened, with callbacks already running, may the stop
        after it still wait for them (``STOPPING``, at most 30 s) when ``start()`` raises.

        :raises BusStateError: if already started, or used in a forked child.
        :raises ConfigurationError: when the deployment or the options cannot work.
        :raises StoreError: when the stored checkpoint cannot be read, is malformed, or was
            written by a bus watching another namespace.
        :raises ThreadFailed: when a bus thread died while starting.
        """
        self._check_pid()
        check_threads_run(self.name)
        with self._state_lock:
            if self._state not in (BusState.NEW, BusState.STOPPED, BusState.FAILED):
                raise BusStateError(
                    f"bus {self.name!r} is {self._state.value}; start() needs a new, stopped or failed bus"
                )
            if not self._subscriptions:
                raise ConfigurationError(
                    f"bus {self.name!r} has no subscriptions: call subscribe() before start()"
                )
            self._run = self._new_run()
            self._signals = 0
            self._error = None
            self._state = BusState.STARTING
        try:
            self._run.start()
            with self._state_lock:
                # A failure after the streams opened but before this point happened while
                # starting too: raise it, rather than say RUNNING (and "started") for a failed bus.
                failed = self._error
                if failed is None and self._state is BusState.STARTING:
                    self._state = BusState.RUNNING
            if failed is not None:
                raise failed
        except BaseException as exc:
            # Whatever failed, end what was started and say so: never left STARTING.
            with self._state_lock:
                if self._error is None:
                    self._error = exc
            self._shutdown(timeout=5.0, quiet=True)
            raise
        log.info(
            "bus %s started: watching %s%s, checkpoint key%s %s",
            self.name,
            self.namespace,
            f" as a member of group {self.group}" if self.group is not None else "",
            "s" if self.group is not None else "",
            self.checkpoint_key_summary,  # a group's partitions' keys, not its unused resume_token_key
        )
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop gracefully: stop the watcher, let running callbacks finish, write the checkpoint.

        Events that did not finish are delivered again after the next start.

        Returns at once for a bus that never started. Takes at most ``timeout`` plus
        ``FINAL_FLUSH_MIN`` (the final checkpoint write, bounded by ``pymongo.timeout()``)
        plus, if the watcher is inside a ``getMore``, up to ``max_await_time``. When it
        returns, the bus's threads have ended except workers inside callbacks still
        running at the deadline (daemon threads: they never keep the process alive).

        :raises ShutdownTimeout: when callbacks were still running when it stopped waiting for
            them, naming them and saying how long it waited (a consumer-group member waits at
            most ``lease_ttl / 3``, to release its leases in time); the checkpoint written is
            still correct, and their events will be delivered again.
        """
        if os.getpid() != self._pid:
            log.warning(
                "bus %s: stop() in forked process %d ignored: the bus runs in process %d",
                self.name,
                os.getpid(),
                self._pid,
            )
            return
        if self._state is BusState.NEW:
            return  # never started: nothing to wait for
        if self._state in (BusState.STOPPED, BusState.FAILED):
            self._run.stopped.wait(timeout)  # set already, or a failure's shutdown is finishing
            return
        self._shutdown(timeout)

    def run_forever(self, stop_timeout: float = 30.0) -> None:
        """Start (if needed) and block until stopped; SIGINT/SIGTERM stop gracefully.

        In the main thread it installs handlers for SIGINT and SIGTERM: the first
        signal stops gracefully (waits up to ``stop_timeout`` for running callbacks), a
        second one stops at once: no more waiting for callbacks, one checkpoint write
        bounded to ``FINAL_FLUSH_MIN`` seconds, then it returns. Callbacks still running
        are abandoned (workers are daemon threads, so they do not keep the process alive)
        and their events are delivered again after restart; a WARNING names them (what
        ``stop()`` raises as :class:`ShutdownTimeout`).

        :raises MongoEventsError: the error that made the bus fail, if it did.
        """
        ensure_logging()  # a runner: a failing bus must print why even when the app set up no logging
        self._check_pid()
        if self._state in (BusState.NEW, BusState.STOPPED):
            self.start()
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            while not self._run.stopped.wait(0.2):
                if self._signals:
                    self._shutdown(0.0 if self._signals > 1 else stop_timeout, quiet=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self._error is not None:
            raise self._error

    def hurry(self) -> None:
        """Make the stop under way (or the next one) stop at once: no more waiting for
        callbacks, one checkpoint write (and the status publisher's final write) bounded
        to ``FINAL_FLUSH_MIN`` seconds each.

        What a second signal does in :meth:`run_forever`, for runners that stop buses
        themselves (``BusRegistry.run_forever()``). Callbacks still running are abandoned;
        their events are delivered again after restart. It only sets an event, so a signal
        handler may call it; it lasts until the bus starts again.

        .. versionadded:: 0.2.0
        """
        self._run.hurry.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            # Runs in the main thread, between two steps of the graceful stop it interrupts:
            # the stop sees the run's hurry and skips the rest of its wait for callbacks.
            self.hurry()
        self._run.stop_event.set()
        # Logged from another thread: the handler may interrupt the main thread in the middle
        # of a write to stderr, and logging from here would then fail ("reentrant call").
        threading.Thread(
            target=log.warning,
            args=(
                "bus %s: got signal %d; %s",
                self.name,
                signum,
                "stopping gracefully (a second signal stops without waiting for callbacks)"
                if self._signals == 1
                else "stopping now: no more waiting for callbacks, one bounded checkpoint write",
            ),
            name=f"mongo_events.signal-log[{self.name}]",
            daemon=True,
        ).start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every event received so far is done (True); False on timeout, or
        when the bus stops before they all are (those left undone come again at the next
        start). For a consumer-group member, a partition revoked meanwhile counts as done:
        its next owner delivers again what was not finished here.

        :raises MongoEventsError: the error that made the bus fail, if it did.
        """
        self._check_pid()
        deadline = None if timeout is None else time.monotonic() + timeout
        run = self._run
        done = run.join(deadline, lambda: self._error is not None or run.stopped.is_set())
        if self._error is not None:
            raise self._error
        return done

    def flush(self) -> bool:
        """Write the current checkpoint now (normally the flusher does this); True on success."""
        self._check_pid()
        flusher = self._run.flusher
        return True if flusher is None else flusher.flush()

    def reset_resume_token(self) -> None:
        """Delete the stored checkpoint; the next start begins from now (or ``start_from_past``).

        :raises BusStateError: while the bus runs (it would write its position again).
        """
        self._check_stopped("reset_resume_token()")
        reset_positions(self.options, self.checkpoint_keys)

    def snapshot(self) -> None:
        """Make the next start deliver every existing document first (see ``snapshot=``).

        Stores a "snapshot requested" marker as the checkpoint, so any process starting
        this bus's key snapshots once, then streams.

        :raises BusStateError: while the bus runs.
        :raises ConfigurationError: without a resume-token store (use ``snapshot="always"``).

        .. versionadded:: 0.2.0
        """
        self._check_stopped("snapshot()")
        request_snapshot(self.options, self.checkpoint_keys)

    def rewind(self, to: datetime | Timestamp) -> None:
        """Make the next start begin at cluster time ``to`` (``startAtOperationTime``).

        Stores a rewind marker as the checkpoint: every change from ``to`` on is delivered
        again (at least once) to every subscription. A naive datetime is UTC. The same as
        ``mongo-events tokens rewind --to ... --yes``.

        :raises BusStateError: while the bus runs (it would write its position again).
        :raises ConfigurationError: without a resume-token store, when the oplog cannot be
            read, or when ``to`` is older than the oldest oplog entry (the message names it).

        .. versionadded:: 0.2.0
        """
        self._check_stopped("rewind()")
        rewind_positions(self.options, self.checkpoint_keys, to)

    def _check_stopped(self, what: str) -> None:
        if self._state in (BusState.STARTING, BusState.RUNNING, BusState.STOPPING):
            raise BusStateError(f"stop the bus before {what}: a running bus writes its position again")

    def __enter__(self) -> Bus:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Bus {self.name!r} {self._state.value}>"

    # -- internals: lifecycle -----------------------------------------------------------

    def _check_pid(self) -> None:
        """A bus started in another process (before a fork) cannot be used here: its threads stayed there."""
        if os.getpid() != self._pid and self._state not in (BusState.NEW, BusState.STOPPED, BusState.FAILED):
            raise BusStateError(
                f"bus {self.name!r} was started in process {self._pid} and cannot be used in the forked child "
                f"{os.getpid()}: create and start buses after the server forks (gunicorn post_fork, uWSGI lazy-apps)"
            )
        self._pid = os.getpid()

    def _initial_position(self) -> Position:
        """Where the stream starts (the consumer decides; a seam for the benchmark)."""
        return self._consumer.initial_position()

    def _fail(self, exc: BaseException) -> None:
        """Stop the bus because of ``exc``: state FAILED, ``error`` set, one ERROR line."""
        with self._state_lock:
            if self._error is not None or self._state in (BusState.STOPPED, BusState.FAILED):
                return
            self._error = exc
        log.error(
            "bus %s failed: %s",
            self.name,
            describe(exc),
            exc_info=exc if isinstance(exc, ThreadFailed) else None,
        )
        # A waiting start() raises exc; a stopper thread shuts the run down.
        self._run.interrupt(exc, lambda: self._shutdown(30.0, quiet=True))

    def _shutdown(self, timeout: float, quiet: bool = False) -> None:
        """Stop every thread and write the final checkpoint, within ``timeout`` (plus at most
        ``FINAL_FLUSH_MIN`` for the final write when the callbacks used the whole timeout).

        A second signal in ``run_forever()``, or :meth:`hurry`, cuts the waits for callbacks short.
        Callbacks still running when the stop stopped waiting are raised as ``ShutdownTimeout``,
        or, when ``quiet``, logged at WARNING: never dropped silently.
        """
        unfinished = self._run.shutdown(timeout, self._stopping, self._finished)
        if unfinished is None:
            return
        if quiet:  # run_forever(), a failure's stopper, a failed start: nobody to raise to
            log.warning("bus %s: %s", self.name, unfinished.message)
            return
        raise ShutdownTimeout(
            f"bus {self.name!r}: {unfinished.message}", running=unfinished.running, waited=unfinished.waited
        )

    def _stopping(self) -> None:
        with self._state_lock:
            self._state = BusState.STOPPING

    def _finished(self, deadline: float) -> str:
        """The end of a shutdown: the final state, then the status publisher's last write."""
        with self._state_lock:
            self._state = BusState.FAILED if self._error is not None else BusState.STOPPED
        if self.status is not None:  # its final write says stopped (or failed)
            timeout = max(0.0, deadline - time.monotonic())
            if self._run.hurry.is_set():  # a hurried stop: bounded like its final checkpoint write
                timeout = min(timeout, FINAL_FLUSH_MIN)
            self.status.detach(timeout)
        return self._state.value

    # -- observability ----------------------------------------------------------------------

    def pending_count(self) -> int:
        """Events this bus received and has not finished yet (some subscription still owes them).

        Process-local, like the Go library's gauge, so summing it over instances is right.
        Across processes, ask the ack store: ``bus.ack_store.pending_count()``.
        """
        return self._run.pending()

    def checkpoint_age(self) -> float | None:
        """Seconds from the cluster time of the stored checkpoint to now (``None`` before one);
        with a group, of the oldest among the partitions held."""
        return self._run.checkpoint_age()

    def oplog_headroom(self) -> float | None:
        """Seconds of oplog between its oldest entry and the stored checkpoint: roughly how long
        the bus may stay down before it cannot resume. ``None`` when the oplog cannot be read
        (no permission on ``local``, a mongos) or before the first checkpoint."""
        return self._run.oplog_headroom()

    def _note_error(self, message: str) -> None:
        """Record ``message`` as the stream's last error (``health().last_error``)."""
        self._consumer.last_error = (message, datetime.now(timezone.utc))

    def health(self) -> Health:
        """A snapshot for health probes (also served as ``GET /v1/health`` by the monitor app).

        ``degraded`` while a recent error is on record; ``unhealthy`` when the bus is not
        running, its stream never opened, or every dead-letter write has failed for
        :data:`DEAD_LETTER_STALL` seconds (the unfinished event holds the window shut, so
        nothing more is delivered until the store accepts it).
        """
        self._check_pid()
        state = self._state
        stalled = self._dead_letter_watch.stall(DEAD_LETTER_STALL)
        return self._run.health(state.value, state is BusState.RUNNING, self._error, stalled)

    def has_subscription(self, name: str) -> bool:
        """Whether a subscription called ``name`` is registered."""
        return any(s.name == name for s in self._subscriptions)

    def replay(self, letter: DeadLetter) -> BaseException | None:
        """Deliver a dead letter once more through its subscription, on the caller's thread.

        The callback gets a :class:`Delivery` with ``replay=True`` and the recorded error;
        the bus's decoder and middleware apply. Returns the callback's exception, if any.
        Most code uses :meth:`mongo_events.DeadLetters.replay` instead.

        :raises ConfigurationError: when no subscription has the letter's ``event_name``.
        """
        o = self.options
        return replay_letter(
            letter,
            self._subscriptions,
            bus_name=self.name,
            decoder=o.decoder,
            middleware=o.chain,
            default_db=o.default_db,
            default_coll=o.default_coll,
            update_description=o.update_description,
        )

    # -- on_error ------------------------------------------------------------------------------

    def _report(
        self, error: BaseException, kind: ErrorKindName, *, event_id: str | None = None, what: str = ""
    ) -> None:
        """Tell ``on_error`` (if any) about an error; see :mod:`mongo_events.reporting`."""
        if self.on_error is not None:
            report_error(self.on_error, error, ErrorContext(kind, self.name, None, event_id, None, what))
