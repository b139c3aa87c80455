"""The bus: the facade over one stream consumer, its subscriptions and their lifecycle.

The bus holds options and their validation, ``subscribe``, the lifecycle
(``start``/``stop``/``run_forever``/``join``) and the public queries. It holds no
per-event logic: the stream consumer (:mod:`mongo_events.consumer`) owns the
watcher, the window and the checkpoint writing; the dispatcher runs callbacks; the
flusher runs the write tasks. See README.rst, "Architecture".
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from types import FrameType, TracebackType
from typing import Any, Literal, TypeVar, overload

import attrs
from bson.timestamp import Timestamp
from pymongo import MongoClient
from pymongo.collection import Collection as MongoCollection
from pymongo.database import Database

from .checkpointing import _takes_namespace
from .consumer import StreamConsumer, StreamSpec
from .deadlettering import dead_letter_hook
from .decoding import CattrsDecoder, Decoder
from .delivery import Delivery
from .dispatch import DeadLetterHook, Dispatcher, call_subscription
from .errors import (
    BusStateError,
    ConfigurationError,
    ShutdownTimeout,
    Skip,
    StoreError,
    ThreadFailed,
)
from .events import ChangeEvent, FullDocument, OperationType
from .flusher import Flusher
from .groups.collision import StampedResumeTokenStore
from .groups.member import partition_key
from .groups.runtime import GroupRuntime
from .guard import describe
from .health import Health, assess
from .history import plan_rewind, rewind_token
from .idempotency.base import IdempotencyStore
from .idempotency.guard import CrashCounter, Idempotency
from .metrics import Metrics
from .middleware.base import Middleware
from .monitor.middleware import MonitorMiddleware
from .monitor.status import ConsumerStatusStore, StatusPublisher
from .monitor.store import MonitorStore
from .options import (
    check_callable,
    check_choice,
    check_group_options,
    check_has_method,
    check_int,
    check_number,
    invalid,
)
from .reporting import ErrorContext, ErrorHandler, ErrorKindName, ErrorReporter, report_error
from .retrying import RetryBackoff
from .runner import ensure_logging
from .snapshot import SnapshotProgress, progress_token
from .stores.base import AckStore, DeadLetterStore, ResumeTokenStore
from .stores.mongodb import DEFAULT_COLLECTION, MongoResumeTokenStore
from .stores.records import DeadLetter
from .subscription import OnExhausted, Subscription
from .watcher import Position

__all__ = ["Bus", "BusState", "HistoryLostPolicy", "Ordering"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
Ordering = Literal["document", "stream", "none"]
HistoryLostPolicy = Literal["raise", "restart_from_now"]

_FULL_DOCUMENT_OPTIONS = {FullDocument.UPDATE_LOOKUP, FullDocument.WHEN_AVAILABLE, FullDocument.REQUIRED}

#: The final checkpoint write at stop() gets at least this many seconds, even when the
#: callbacks used the whole timeout.
FINAL_FLUSH_MIN = 1.0


def _check_bus_options(o: Mapping[str, Any]) -> None:
    """Refuse every bad :class:`Bus` option with a :class:`ConfigurationError` naming it."""
    if o["name"] is not None and not isinstance(o["name"], str):
        raise invalid("name", o["name"], "a str or None")
    check_choice("full_document", o["full_document"], [None, *FullDocument])
    check_choice(
        "full_document_before_change",
        o["full_document_before_change"],
        [None, "off", "whenAvailable", "required"],
    )
    for flag in (
        "full_document_only",
        "update_description",
        "include_empty_updates",
        "show_expanded_events",
        "resume",
    ):
        if not isinstance(o[flag], bool):
            raise invalid(flag, o[flag], "True or False")
    check_int("max_updated_fields_size", o["max_updated_fields_size"], 0)
    pipeline = o["pipeline"]
    if pipeline is not None and (
        isinstance(pipeline, (str, bytes, Mapping)) or not isinstance(pipeline, Sequence)
    ):
        raise invalid("pipeline", pipeline, "a list of stages such as [{'$match': ...}]")
    for stage in pipeline or ():
        if not isinstance(stage, Mapping) or len(stage) != 1:
            raise invalid(
                "pipeline",
                pipeline,
                f"a list of one-key mappings such as {{'$match': ...}} (bad stage: {stage!r})",
            )
    check_int("batch_size", o["batch_size"], 0, allow_none=True)
    if not isinstance(o["max_await_time"], timedelta):
        check_number("max_await_time", o["max_await_time"])
    elif o["max_await_time"] <= timedelta(0):
        raise invalid("max_await_time", o["max_await_time"], "a positive number of seconds or timedelta")
    store = o["resume_token_store"]
    if store is not None and not isinstance(store, ResumeTokenStore):
        raise invalid(
            "resume_token_store",
            store,
            "a mongo_events.ResumeTokenStore (MongoResumeTokenStore, FileResumeTokenStore ...) or None",
        )
    coll = o["resume_token_collection"]
    if coll is not None and not isinstance(coll, (MongoCollection, str)):
        raise invalid("resume_token_collection", coll, "a pymongo Collection, a collection name or None")
    if o["resume_token_id"] is not None and (
        not isinstance(o["resume_token_id"], str) or not o["resume_token_id"]
    ):
        raise invalid("resume_token_id", o["resume_token_id"], "a non-empty str or None")
    past = o["start_from_past"]
    if past is not None and past != "all" and (not isinstance(past, timedelta) or past <= timedelta(0)):
        raise invalid("start_from_past", past, 'a positive datetime.timedelta, "all" or None')
    check_int("max_workers", o["max_workers"], 1)
    check_int("max_in_flight", o["max_in_flight"], 1)
    check_choice("ordering", o["ordering"], ["document", "stream", "none"])
    check_number("flush_interval", o["flush_interval"])
    if o["decoder"] is not None:
        check_has_method("decoder", o["decoder"], "decode", "a mongo_events.Decoder")
    middleware = o["middleware"]
    if (
        isinstance(middleware, (str, bytes, Mapping))
        or not isinstance(middleware, Sequence)
        or not all(isinstance(m, Middleware) for m in middleware)
    ):
        raise invalid("middleware", middleware, "a list of mongo_events.Middleware instances")
    dead = o["dead_letters"]
    if dead is not None and not isinstance(dead, DeadLetterStore) and not callable(dead):
        raise invalid(
            "dead_letters",
            dead,
            "a mongo_events.DeadLetterStore, a function (event, subscription, error, attempts) or None",
        )
    if o["ack_store"] is not None and not isinstance(o["ack_store"], AckStore):
        raise invalid(
            "ack_store", o["ack_store"], "a mongo_events.AckStore (MongoAckStore, MemoryAckStore) or None"
        )
    check_choice("on_history_lost", o["on_history_lost"], ["raise", "restart_from_now"])
    check_choice("snapshot", o["snapshot"], [None, "initial", "always"])
    check_int("snapshot_batch_size", o["snapshot_batch_size"], 1)
    names = o["snapshot_collections"]
    if names is not None and (
        isinstance(names, str) or not all(isinstance(n, str) and n for n in names) or not names
    ):
        raise invalid("snapshot_collections", names, "a non-empty list of collection names or None")
    if o["snapshot_filter"] is not None and not isinstance(o["snapshot_filter"], Mapping):
        raise invalid("snapshot_filter", o["snapshot_filter"], "a query document (a dict) or None")
    if (
        o["snapshot"] is not None
        and isinstance(o["target"], MongoClient)
        and (names is None or not all("." in n for n in names))
    ):
        raise invalid(
            "snapshot_collections", names, 'a list of "db.coll" names: a cluster bus snapshots only those'
        )
    check_callable("history_lost_callback", o["history_lost_callback"], "a function (key, since) or None")
    check_number("start_timeout", o["start_timeout"])
    if o["metrics"] is not None and not isinstance(o["metrics"], Metrics):
        raise invalid("metrics", o["metrics"], "a mongo_events.Metrics or None")
    if o["monitor"] is not None and not isinstance(o["monitor"], (MonitorStore, MonitorMiddleware)):
        raise invalid(
            "monitor", o["monitor"], "a mongo_events.monitor.MonitorStore, a MonitorMiddleware or None"
        )


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


class Bus:
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
        group: str | None = None,
        partitions: int = 1,
        lease_ttl: float = 10.0,
    ) -> None:
        if isinstance(target, MongoCollection):
            self.level = "collection"
            self._db: Database[Any] = target.database
            self._namespace = f"{target.database.name}.{target.name}"
            self._default_coll: str | None = target.name
        elif isinstance(target, Database):
            self.level = "database"
            self._db = target
            self._namespace = f"{target.name}.*"
            self._default_coll = None
        elif isinstance(target, MongoClient):
            self.level = "cluster"
            self._db = target.admin
            self._namespace = "*.*"
            self._default_coll = None
        else:
            raise ConfigurationError(
                f"Bus needs a pymongo Collection, Database or MongoClient to watch, got {type(target).__name__}"
            )
        self._target = target
        self._resume_token_id = resume_token_id or _hostname()
        self._default_db = self._db.name if self.level != "cluster" else ""
        self.name = name or self._namespace

        _check_bus_options(locals())
        check_group_options(group, partitions, lease_ttl, resume=resume, snapshot=snapshot)
        fd = FullDocument(full_document) if full_document is not None else None
        has_full = fd in _FULL_DOCUMENT_OPTIONS
        if max_updated_fields_size and not has_full:
            raise ConfigurationError(
                "max_updated_fields_size drops updated fields, so callbacks need the full document instead: "
                "also pass full_document=FullDocument.UPDATE_LOOKUP (or WHEN_AVAILABLE / REQUIRED)"
            )
        if full_document_only and not has_full:
            raise ConfigurationError(
                "full_document_only needs the stream to carry full documents for updates: "
                "also pass full_document=FullDocument.UPDATE_LOOKUP (or WHEN_AVAILABLE / REQUIRED)"
            )
        if resume_token_store is not None and resume_token_collection is not None:
            raise ConfigurationError("pass resume_token_store or resume_token_collection, not both")
        if not resume and (resume_token_store is not None or resume_token_collection is not None):
            raise ConfigurationError(
                "resume=False stores no position: drop resume_token_store / resume_token_collection, or resume"
            )

        self.full_document = fd
        self.full_document_before_change = full_document_before_change
        self.full_document_only = full_document_only
        self.update_description = update_description or max_updated_fields_size > 0
        self.include_empty_updates = include_empty_updates
        self.max_updated_fields_size = max_updated_fields_size
        self.pipeline = [dict(s) for s in pipeline or ()]
        self.batch_size = batch_size
        self.max_await_time = (
            max_await_time.total_seconds() if isinstance(max_await_time, timedelta) else float(max_await_time)
        )
        self.show_expanded_events = show_expanded_events
        self.resume = resume
        self.start_from_past = start_from_past
        self.max_workers = max_workers
        self.max_in_flight = max_in_flight
        self.ordering: Ordering = ordering
        self.flush_interval = flush_interval
        self.on_history_lost: HistoryLostPolicy = on_history_lost
        self.history_lost_callback = history_lost_callback
        self.snapshot_mode = snapshot
        self.snapshot_collections = list(snapshot_collections) if snapshot_collections is not None else None
        self.snapshot_filter = dict(snapshot_filter) if snapshot_filter is not None else None
        self.snapshot_batch_size = snapshot_batch_size
        self.start_timeout = start_timeout
        self._decoder: Decoder = decoder or CattrsDecoder()
        self.metrics = metrics
        self.monitor: MonitorMiddleware | None = (
            MonitorMiddleware(monitor) if isinstance(monitor, MonitorStore) else monitor
        )
        # The monitor runs outermost (it sees what every other hook sees), then metrics.
        self._middleware = [m for m in (self.monitor, metrics) if m is not None] + list(middleware)
        self.on_error = on_error
        if on_error is not None:
            self._middleware.append(ErrorReporter(on_error, self.name))
        self.dead_letter_store = dead_letters if isinstance(dead_letters, DeadLetterStore) else None
        #: Since when (monotonic) every dead-letter write failed; None while they succeed.
        self._dead_letter_failing_since: float | None = None
        self._dead_letters = dead_letter_hook(
            dead_letters,
            bus_name=self.name,
            resume_token_key=self.resume_token_key,
            on_error=on_error,
            on_outcome=self._on_dead_letter_outcome,
        )
        self.ack_store = ack_store
        self.status: StatusPublisher | None = (
            StatusPublisher(status) if isinstance(status, ConsumerStatusStore) else status
        )
        if self.status is not None:
            self._middleware.append(self.status)  # it counts deliveries for the dashboard
        self.idempotency = _idempotency(idempotency)
        if crash_store is not None and not isinstance(crash_store, IdempotencyStore):
            raise ConfigurationError(
                f"crash_store must be an IdempotencyStore, got {type(crash_store).__name__}"
            )
        self._crash_counter = CrashCounter(crash_store) if crash_store is not None else None

        if not resume:
            self.token_store: ResumeTokenStore | None = None
        elif resume_token_store is not None:
            self.token_store = resume_token_store
        elif isinstance(resume_token_collection, MongoCollection):
            self.token_store = MongoResumeTokenStore(resume_token_collection)
        else:
            self.token_store = MongoResumeTokenStore(self._db[resume_token_collection or DEFAULT_COLLECTION])

        # Consumer groups (see mongo_events.groups.runtime): None keeps one stream consumer.
        self.group, self.partitions, self.lease_ttl = group, partitions, float(lease_ttl)
        if group is not None:
            GroupRuntime(self, group, partitions, lease_ttl)  # refuses a store that cannot fence, now

        self._subscriptions: list[Subscription] = []
        self._state = BusState.NEW
        self._state_lock = threading.Lock()
        self._error: BaseException | None = None
        self._pid = os.getpid()
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._stop_event = threading.Event()
        self._stopped = threading.Event()
        self._consumer = StreamConsumer(
            self._spec(),
            self._subscriptions,
            token_store=_stamped(self.token_store, self.name) if self.group is None else self.token_store,
            ack_store=self.ack_store,
            dead_letters=self._dead_letters,
            metrics=self.metrics,
            stop_event=self._stop_event,
            fail=self._fail,
            report=self._report,
        )
        self._dispatcher: Dispatcher | None = None
        self._flusher: Flusher | None = None
        self._group: GroupRuntime | None = (
            GroupRuntime(self, self.group, self.partitions, self.lease_ttl)
            if self.group is not None
            else None
        )
        self._shutdown_lock = threading.Lock()
        self._signals = 0
        #: Set by a second SIGINT/SIGTERM in run_forever(): stop without waiting for callbacks.
        self._hurry = threading.Event()

    def _spec(self) -> StreamSpec:
        return StreamSpec(
            name=self.name,
            target=self._target,
            level=self.level,
            namespace=self._namespace,
            default_db=self._default_db,
            default_coll=self._default_coll,
            db_name=self._db.name,
            client=self._db.client,
            resume_token_key=self.resume_token_key,
            full_document=self.full_document,
            full_document_before_change=self.full_document_before_change,
            full_document_only=self.full_document_only,
            update_description=self.update_description,
            include_empty_updates=self.include_empty_updates,
            max_updated_fields_size=self.max_updated_fields_size,
            pipeline=self.pipeline,
            batch_size=self.batch_size,
            max_await_time=self.max_await_time,
            show_expanded_events=self.show_expanded_events,
            start_from_past=self.start_from_past,
            max_in_flight=self.max_in_flight,
            ordering=self.ordering,
            on_history_lost=self.on_history_lost,
            history_lost_callback=self.history_lost_callback,
            snapshot=self.snapshot_mode,
            snapshot_collections=self.snapshot_collections,
            snapshot_filter=self.snapshot_filter,
            snapshot_batch_size=self.snapshot_batch_size,
        )

    # -- properties ---------------------------------------------------------------

    @property
    def resume_token_key(self) -> str:
        """``"<db.coll | db.* | *.*>:<resume_token_id>"``, the seed's key format."""
        return f"{self._namespace}:{self._resume_token_id}"

    @property
    def checkpoint_keys(self) -> list[str]:
        """Where this bus's positions are stored: :attr:`resume_token_key`, or with a group one key
        per partition (``"<group>:<namespace>#<p>"``), which ``reset_resume_token()``, ``rewind()``
        and ``snapshot()`` act on (stop every member of the group first).

        .. versionadded:: 0.2.0
        """
        if self.group is None:
            return [self.resume_token_key]
        return [partition_key(self.group, self._namespace, p) for p in range(self.partitions)]

    @property
    def namespace(self) -> str:
        """What is watched: ``db.coll``, ``db.*`` or ``*.*``."""
        return self._namespace

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
        """The in-memory checkpoint: the token the flusher writes next."""
        return self._consumer.window.checkpoint()  # type: ignore[return-value]

    @property
    def in_flight(self) -> int:
        """Events held after the checkpoint, finished or not (at most ``max_in_flight`` per partition)."""
        if self._group is not None:
            return self._group.in_flight()
        return self._consumer.window.size()

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
                idempotency=_idempotency(idempotency) or self.idempotency or self._crash_counter,
            )
            if payload is not None:
                self._check_payload(payload)
            if any(s.name == sub.name for s in self._subscriptions):
                raise ConfigurationError(
                    f"a subscription named {sub.name!r} already exists on bus {self.name!r}; pass name=..."
                )
            self._subscriptions.append(sub)
            return fn

        if callback is not None:
            return register(callback)
        return register

    def _check_payload(self, payload: Any) -> None:
        """Ask the converter for ``payload``'s structure hook now, not at the first event."""
        decoder = self._decoder
        if not isinstance(decoder, CattrsDecoder) or payload is dict or payload is Any:
            return  # a custom decoder: only it knows what it can build
        lookup = getattr(decoder.converter, "get_structure_hook", None)  # cattrs 24+
        if lookup is None:
            return
        try:
            lookup(payload)
        except Exception as exc:
            raise invalid(
                "payload",
                payload,
                f"a type the decoder's cattrs converter can structure ({exc}); use a dataclass, attrs class, "
                "TypedDict or dict, or register a hook on make_converter() and pass decoder=CattrsDecoder(converter)",
            ) from exc

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> Bus:
        """Start watching in background threads; returns at once the stream has opened.

        Waits up to ``start_timeout`` for the first stream so that a standalone server,
        bad credentials, an invalid pipeline or an unreadable checkpoint fail here.
        If the server is merely unreachable, the watcher keeps retrying in the background,
        loudly: ERROR lines at each retry and ``health()`` ``unhealthy`` until the stream
        opens. A ``start()`` that raises leaves the bus ``FAILED`` with :attr:`error` set
        (its threads ended); a new, stopped or failed bus can be started.

        :raises BusStateError: if already started, or used in a forked child.
        :raises ConfigurationError: when the deployment or the options cannot work.
        :raises StoreError: when the stored checkpoint cannot be read, is malformed, or was
            written by a bus watching another namespace.
        :raises ThreadFailed: when a bus thread died while starting.
        """
        self._check_pid()
        self._check_runtime()
        with self._state_lock:
            if self._state not in (BusState.NEW, BusState.STOPPED, BusState.FAILED):
                raise BusStateError(
                    f"bus {self.name!r} is {self._state.value}; start() needs a new, stopped or failed bus"
                )
            if not self._subscriptions:
                raise ConfigurationError(
                    f"bus {self.name!r} has no subscriptions: call subscribe() before start()"
                )
            self._reset_runtime()
            self._error = None
            self._state = BusState.STARTING
        try:
            self._start()
        except BaseException as exc:
            # Whatever failed, end what was started and say so: never left STARTING.
            with self._state_lock:
                if self._error is None:
                    self._error = exc
            self._shutdown(timeout=5.0, quiet=True)
            raise
        with self._state_lock:
            if self._state is BusState.STARTING:
                self._state = BusState.RUNNING
        log.info(
            "bus %s started: watching %s, checkpoint key %s",
            self.name,
            self._namespace,
            self.resume_token_key,
        )
        return self

    def _start(self) -> None:
        for store in (
            self.token_store,
            self.ack_store,
            self.dead_letter_store,
            self.monitor.store if self.monitor else None,
            *self._idempotency_stores(),
        ):
            if store is None:
                continue
            try:
                store.ensure_indexes()
            except StoreError as exc:
                log.warning(
                    "could not create indexes for %s (%s); going on without them", type(store).__name__, exc
                )
                self._report(exc, "store", what=f"create indexes ({type(store).__name__})")
        if self._group is not None:
            self._start_group(self._group)
            return
        consumer = self._consumer
        # One pool per bus, on the consumer's window lock: finishing costs one acquisition.
        self._dispatcher = Dispatcher(
            max_workers=self.max_workers,
            decoder=self._decoder,
            middleware=self._middleware,
            on_done=consumer.window.finish,
            on_fatal=self._fail,
            dead_letters=self._dead_letters,
            bus_name=self.name,
            lock=consumer.window.mutex,
        )
        tasks = [consumer.checkpointer.flush]
        if self.monitor is not None:
            tasks.append(self._reporting_task(self.monitor.flush, "write monitor entries"))
        if self.metrics is not None:
            tasks.append(consumer.oplog.refresh)
        self._flusher = Flusher(tasks, self.flush_interval, self.name, on_fatal=self._fail)
        consumer.attach(self._dispatcher, self._flusher.wake)
        try:
            position = self._initial_position()
        except StoreError as exc:
            self._report(exc, "store", what="read checkpoint")
            raise
        if self.metrics is not None:
            self.metrics.attach(self)
        self._dispatcher.start()
        self._flusher.start()
        if self.status is not None:
            self.status.attach(self)
        consumer.start(position)
        if consumer.connected.wait(self.start_timeout):
            if consumer.connect_error is not None:
                raise consumer.connect_error
        else:
            # Web apps start at boot and must not hang on a server that is down: keep trying in
            # the background, but loudly: ERROR here and at each retry, health "unhealthy".
            message = f"the change stream on {self._namespace} did not open within {self.start_timeout:.0f}s; still trying in the background"
            consumer.last_error = (message, datetime.now(timezone.utc))
            log.error(
                "bus %s: %s; health is unhealthy and nothing is delivered until it opens", self.name, message
            )

    def _start_group(self, group: GroupRuntime) -> None:
        """Start as a consumer-group member: a stream consumer per partition held (see runtime)."""
        tasks = [group.flush]
        if self.monitor is not None:
            tasks.append(self._reporting_task(self.monitor.flush, "write monitor entries"))
        self._flusher = Flusher(tasks, self.flush_interval, self.name, on_fatal=self._fail)
        if self.metrics is not None:
            self.metrics.attach(self)
        self._flusher.start()
        group.start()
        if self.status is not None:  # after the first share: its first status names the partitions
            self.status.attach(self)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop gracefully: stop the watcher, let running callbacks finish, write the checkpoint.

        Events that did not finish are delivered again after the next start.

        Returns at once for a bus that never started. Takes at most ``timeout`` plus
        ``FINAL_FLUSH_MIN`` (the final checkpoint write, bounded by ``pymongo.timeout()``)
        plus, if the watcher is inside a ``getMore``, up to ``max_await_time``. When it
        returns, the bus's threads have ended except workers inside callbacks still
        running at the deadline (daemon threads: they never keep the process alive).

        :raises ShutdownTimeout: when callbacks were still running at the deadline, naming them
            (the checkpoint written is still correct; they will be redelivered).
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
            self._stopped.wait(timeout)  # set already, or a failure's shutdown is finishing
            return
        self._shutdown(timeout)

    def run_forever(self, stop_timeout: float = 30.0) -> None:
        """Start (if needed) and block until stopped; SIGINT/SIGTERM stop gracefully.

        In the main thread it installs handlers for SIGINT and SIGTERM: the first
        signal stops gracefully (waits up to ``stop_timeout`` for running callbacks), a
        second one stops at once: no more waiting for callbacks, one checkpoint write
        bounded to ``FINAL_FLUSH_MIN`` seconds, then it returns. Callbacks still running
        are abandoned (workers are daemon threads, so they do not keep the process alive)
        and their events are delivered again after restart.

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
            while not self._stopped.wait(0.2):
                if self._signals:
                    self._shutdown(0.0 if self._signals > 1 else stop_timeout, quiet=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self._error is not None:
            raise self._error

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            # Runs in the main thread, between two steps of the graceful stop it interrupts:
            # the stop sees _hurry and skips the rest of its wait for callbacks.
            self._hurry.set()
        self._stop_event.set()
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
        """Wait until every event received so far is done; returns False on timeout.

        :raises MongoEventsError: the error that made the bus fail, if it did.
        """
        self._check_pid()
        deadline = None if timeout is None else time.monotonic() + timeout
        window = self._consumer.window
        if self._group is not None and not self._group.join(
            deadline, lambda: self._error is not None or self._stopped.is_set()
        ):
            return False
        with window.cond:
            if not window.wait_for_done(
                window.tracker.last_seq, deadline, lambda: self._error is not None or self._stopped.is_set()
            ):
                return False
        if self._error is not None:
            raise self._error
        return True

    def flush(self) -> bool:
        """Write the current checkpoint now (normally the flusher does this); True on success."""
        self._check_pid()
        if self._flusher is None:
            return True
        return self._flusher.flush()

    def reset_resume_token(self) -> None:
        """Delete the stored checkpoint; the next start begins from now (or ``start_from_past``).

        :raises BusStateError: while the bus runs (it would write its position again).
        """
        if self._state in (BusState.STARTING, BusState.RUNNING, BusState.STOPPING):
            raise BusStateError(
                "stop the bus before reset_resume_token(): a running bus writes its position again"
            )
        if self.token_store is not None:
            for key in self.checkpoint_keys:
                self.token_store.delete(key)
                log.info("bus %s: resume token %s reset", self.name, key)

    def snapshot(self) -> None:
        """Make the next start deliver every existing document first (see ``snapshot=``).

        Stores a "snapshot requested" marker as the checkpoint, so any process starting
        this bus's key snapshots once, then streams.

        :raises BusStateError: while the bus runs.
        :raises ConfigurationError: without a resume-token store (use ``snapshot="always"``).

        .. versionadded:: 0.2.0
        """
        if self._state in (BusState.STARTING, BusState.RUNNING, BusState.STOPPING):
            raise BusStateError("stop the bus before snapshot(): a running bus writes its position again")
        if self.token_store is None:
            raise ConfigurationError(
                f"bus {self.name!r} has no resume-token store to keep the request: pass snapshot='always'"
            )
        if self.level == "cluster" and not self.snapshot_collections:
            raise ConfigurationError('a cluster bus snapshots only snapshot_collections=["db.coll", ...]')
        for key in self.checkpoint_keys:
            self.token_store.save(
                key,
                progress_token(SnapshotProgress(None)),
                None,
                **(
                    {"namespace": self._namespace, "level": self.level}
                    if _takes_namespace(self.token_store)
                    else {}
                ),
            )
        log.info("bus %s: a snapshot will run at the next start", self.name)

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
        if self._state in (BusState.STARTING, BusState.RUNNING, BusState.STOPPING):
            raise BusStateError("stop the bus before rewind(): a running bus writes its position again")
        if self.token_store is None:
            raise ConfigurationError(
                f"bus {self.name!r} has no resume-token store: there is nothing to rewind"
            )
        plan = plan_rewind(self._db.client, to, count=False)
        for key in self.checkpoint_keys:
            self.token_store.save(
                key,
                rewind_token(plan.to),
                plan.to,
                **(
                    {"namespace": self._namespace, "level": self.level}
                    if _takes_namespace(self.token_store)
                    else {}
                ),
            )
            log.info("bus %s: rewound %s to cluster time %s", self.name, key, plan.to)

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

    def _check_runtime(self) -> None:
        """Fail fast where background threads cannot run: uWSGI without threads."""
        uwsgi = sys.modules.get("uwsgi")
        if uwsgi is None:
            return
        opt = getattr(uwsgi, "opt", {}) or {}

        def on(key: str) -> bool:
            value = opt.get(key)
            return bool(value) and value not in (b"0", b"false", "0", "false")

        if not (on("enable-threads") or on("threads")):
            raise ConfigurationError(
                f"bus {self.name!r} needs threads, and this uWSGI runs without them: its watcher and workers "
                "would never run. Add enable-threads = true (or threads = N) to the uWSGI configuration, and "
                "lazy-apps = true so buses start after the fork"
            )

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
        self._consumer.failed_to_start(exc)  # if start() is waiting for the stream: it raises this
        self._stop_event.set()
        window = self._consumer.window
        with window.cond:
            window.cond.notify_all()
        threading.Thread(
            target=self._stop_after_failure, name=f"mongo_events.stopper[{self.name}]", daemon=True
        ).start()

    def _stop_after_failure(self) -> None:
        try:
            self._shutdown(30.0, quiet=True)
        except BaseException as exc:  # the bus is FAILED already (see _shutdown); say what else broke
            log.error(
                "bus %s: stopping after the failure also failed: %s", self.name, describe(exc), exc_info=exc
            )

    def _shutdown(self, timeout: float, quiet: bool = False) -> None:
        """Stop every thread and write the final checkpoint, within ``timeout`` (plus at most
        ``FINAL_FLUSH_MIN`` for the final write when the callbacks used the whole timeout).

        ``_hurry`` (a second signal in ``run_forever()``) cuts the waits for callbacks short.
        """
        running: list[str] = []
        if not self._shutdown_lock.acquire(blocking=False):
            # Another shutdown is under way (the stopper thread after a failure, or a concurrent
            # stop()): wait for it within this call's own bound, not for the whole of its run.
            if not self._stopped.wait(timeout + FINAL_FLUSH_MIN):
                log.warning(
                    "bus %s: the shutdown already under way did not finish within %.1fs; stop() returns",
                    self.name,
                    timeout + FINAL_FLUSH_MIN,
                )
            return
        try:
            if self._stopped.is_set():
                return
            with self._state_lock:
                self._state = BusState.STOPPING
            deadline = time.monotonic() + timeout
            try:
                running = self._stop_threads(deadline)
            finally:
                with self._state_lock:
                    self._state = BusState.FAILED if self._error is not None else BusState.STOPPED
                if self.status is not None:  # its final write says stopped (or failed)
                    self.status.detach(max(0.0, deadline - time.monotonic()))
                self._stopped.set()
                window = self._consumer.window
                with window.cond:
                    window.cond.notify_all()
            log.info(
                "bus %s %s; checkpoint %s", self.name, self._state.value, self._consumer.window.checkpoint()
            )
        finally:
            self._shutdown_lock.release()
        if running and not quiet:
            raise ShutdownTimeout(
                f"bus {self.name!r}: callbacks were still running after {timeout:.1f}s: {'; '.join(running)}. "
                "Their events were not checkpointed and will be delivered again after restart"
            )

    def _stop_threads(self, deadline: float) -> list[str]:
        """The shutdown steps; returns the callbacks still running at the deadline."""
        hurry = self._hurry
        # Order matters: stop reading first so nothing new is admitted; then stop
        # handing out work and let running callbacks finish; then write the
        # watermark, which now covers everything that finished.
        self._stop_event.set()
        # A group member stops its partitions (bounded by lease_ttl / 3) and releases their leases.
        running: list[str] = self._group.stop(deadline) if self._group is not None else []
        consumer = self._consumer
        with consumer.window.cond:
            consumer.window.cond.notify_all()
        consumer.stop_watcher(deadline, hurry)  # a second signal stops waiting for it
        if self._dispatcher is not None:
            self._dispatcher.halt()
            if not self._dispatcher.wait_idle(deadline, hurry):
                running = self._dispatcher.running()
            # Idle workers end at once (halt woke them); busy ones are daemon threads that
            # cannot be stopped: they end when their callback returns, and never hold exit.
            soon = time.monotonic() + FINAL_FLUSH_MIN / 2
            self._dispatcher.join(soon if hurry.is_set() else max(deadline, soon))
            self._dispatcher.shutdown()
        if self._flusher is not None:
            # The flusher thread and the one final write share what is left of the timeout,
            # and at least FINAL_FLUSH_MIN (all of it after a second signal). An unreachable
            # store cannot hold stop() for pymongo's default 30 s server selection:
            # pymongo.timeout() bounds every operation of the final write.
            now = time.monotonic()
            grace = now + FINAL_FLUSH_MIN if hurry.is_set() else max(deadline, now + FINAL_FLUSH_MIN)
            self._flusher.stop(grace - now)
            budget = max(0.0, grace - time.monotonic())
            if not self._flusher.flush(timeout=budget):
                log.error(
                    "bus %s: the final checkpoint was not stored within %.1fs; the next start redelivers "
                    "every event after the last stored checkpoint (%s)",
                    self.name,
                    grace - now,
                    consumer.last_error[0] if consumer.last_error else "no error recorded",
                )
        if self.metrics is not None:
            try:
                self.metrics.detach(self)
            except Exception:
                log.exception("bus %s: detaching metrics failed", self.name)
        for store in (
            self.token_store,
            self.ack_store,
            self.dead_letter_store,
            self.monitor.store if self.monitor else None,
        ):
            if store is not None:
                try:
                    store.close()
                except Exception:
                    log.exception("closing %s failed", type(store).__name__)
        return running

    # -- observability ----------------------------------------------------------------------

    def pending_count(self) -> int:
        """Events this bus received and has not finished yet (some subscription still owes them).

        Process-local, like the Go library's gauge, so summing it over instances is right.
        Across processes, ask the ack store: ``bus.ack_store.pending_count()``.
        """
        if self._group is not None:
            return self._group.pending()
        return self._consumer.window.pending()

    def checkpoint_age(self) -> float | None:
        """Seconds from the cluster time of the stored checkpoint to now (``None`` before one);
        with a group, of the oldest among the partitions held."""
        if self._group is not None:
            return self._group.checkpoint_age()
        return self._consumer.checkpoint_age()

    def oplog_headroom(self) -> float | None:
        """Seconds of oplog between its oldest entry and the stored checkpoint: roughly how long
        the bus may stay down before it cannot resume. ``None`` when the oplog cannot be read
        (no permission on ``local``, a mongos) or before the first checkpoint."""
        if self._group is not None:
            return self._group.oplog_headroom()
        return self._consumer.oplog_headroom()

    def _on_dead_letter_outcome(self, error: BaseException | None) -> None:
        """A dead-letter write succeeded (``None``) or failed: the event stays undone meanwhile."""
        if error is None:
            self._dead_letter_failing_since = None
            return
        if self._dead_letter_failing_since is None:
            self._dead_letter_failing_since = time.monotonic()
        message = (
            f"dead-letter write failed ({describe(error)}); the event stays undone and holds the checkpoint"
        )
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
        if self._group is not None:
            return self._group.health(state.value, state is BusState.RUNNING, self._error)
        consumer = self._consumer
        if self.metrics is None:
            try:
                consumer.oplog.refresh()
            except Exception:  # a health probe must answer
                log.exception("bus %s: oplog window check failed", self.name)
        health = assess(
            state=state.value,
            running=state is BusState.RUNNING,
            opened=consumer.opened,
            stream_active=consumer.stream_active,
            namespace=self._namespace,
            last_event=consumer.last_event,
            last_error=consumer.last_error,
            failure=self._error,
            checkpoint_age=self.checkpoint_age(),
            oplog_headroom=self.oplog_headroom(),
            pending=self.pending_count(),
            in_flight=self.in_flight,
            reconnections=consumer.reconnections,
            stalled=self._dead_letter_stall(),
        )
        runner = consumer.snapshot_runner
        if runner is None:
            return health
        return attrs.evolve(
            health, phase=runner.phase, snapshot_read=runner.read, snapshot_total=runner.total
        )

    def _dead_letter_stall(self) -> str | None:
        since = self._dead_letter_failing_since
        if since is None or time.monotonic() - since < DEAD_LETTER_STALL:
            return None
        return (
            f"every dead-letter write has failed for {time.monotonic() - since:.0f}s; delivery is held back"
        )

    def _idempotency_stores(self) -> list[IdempotencyStore]:
        """Each distinct idempotency store the subscriptions use (their indexes are made at start)."""
        stores: list[IdempotencyStore] = []
        for sub in self._subscriptions:
            if sub.idempotency is not None and all(s is not sub.idempotency.store for s in stores):
                stores.append(sub.idempotency.store)
        return stores

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
        sub = next((s for s in self._subscriptions if s.name == letter.event_name), None)
        if sub is None:
            raise ConfigurationError(
                f"bus {self.name!r} has no subscription {letter.event_name!r} to replay dead letter {letter.id}"
            )
        event = ChangeEvent.from_raw(
            letter.payload, self._db.name if self.level != "cluster" else "", self._default_coll
        )
        delivery = Delivery(
            event=event,
            subscription=sub.name,
            attempt=letter.replay_count + 1,
            update_description=event.update_description if self.update_description else None,
            cluster_time=event.cluster_time,
            bus=self.name,
            replay=True,
            original_error=letter.error,
        )
        error = call_subscription(sub, event, delivery, self._decoder, self._middleware)
        return None if isinstance(error, Skip) else error  # a skipped replay (a duplicate) is done

    # -- on_error ------------------------------------------------------------------------------

    def _report(
        self, error: BaseException, kind: ErrorKindName, *, event_id: str | None = None, what: str = ""
    ) -> None:
        """Tell ``on_error`` (if any) about an error; see :mod:`mongo_events.reporting`."""
        if self.on_error is not None:
            report_error(self.on_error, error, ErrorContext(kind, self.name, None, event_id, None, what))

    def _reporting_task(self, task: Callable[[], None], what: str) -> Callable[[], None]:
        """A flusher task that reports its failures (kind ``store``) before they propagate."""
        if self.on_error is None:
            return task

        def run() -> None:
            try:
                task()
            except Exception as exc:
                self._report(exc, "store", what=what)
                raise

        return run


def _idempotency(value: IdempotencyStore | Idempotency | None) -> Idempotency | None:
    if value is None or isinstance(value, Idempotency):
        return value
    if isinstance(value, IdempotencyStore):
        return Idempotency(value)
    raise ConfigurationError(
        f"idempotency must be an IdempotencyStore or an Idempotency, got {type(value).__name__}"
    )


def _stamped(store: ResumeTokenStore | None, bus: str) -> ResumeTokenStore | None:
    """Without a group, the default MongoDB store stamps its writes to notice a second live writer."""
    return StampedResumeTokenStore(store, bus) if type(store) is MongoResumeTokenStore else store


def _hostname() -> str:
    try:
        return socket.gethostname() or "default"
    except OSError:
        return "default"
