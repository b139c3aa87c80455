"""The bus: one change stream, its subscriptions, and their lifecycle.

The bus only wires the parts together and runs the lifecycle; each part has
its own module: the watcher pulls the stream, the tracker keeps the in-flight
window and the watermark, the dispatcher runs callbacks, the flusher writes
checkpoints.
"""

from __future__ import annotations

import enum
import inspect
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from types import FrameType, TracebackType
from typing import Any, Literal, NamedTuple, TypeVar, overload

import attrs
import bson
from bson import ObjectId
from bson.timestamp import Timestamp
from pymongo import MongoClient
from pymongo.change_stream import ChangeStream
from pymongo.collection import Collection as MongoCollection
from pymongo.database import Database
from pymongo.errors import PyMongoError

from .decoding import CattrsDecoder, Decoder
from .delivery import Delivery
from .dispatch import DeadLetterHook, Dispatcher, WorkItem, call_subscription
from .errors import (
    BusStateError,
    ConfigurationError,
    MongoEventsError,
    ResumeTokenLost,
    ShutdownTimeout,
    Skip,
    StoreError,
    StreamError,
    ThreadFailed,
)
from .events import ChangeEvent, FullDocument, OperationType
from .flusher import Flusher
from .guard import describe
from .health import Health, token_time
from .idempotency.base import IdempotencyStore
from .idempotency.guard import CrashCounter, Idempotency
from .metrics import Metrics
from .middleware.base import Middleware
from .monitor.middleware import MonitorMiddleware
from .monitor.status import ConsumerStatusStore, StatusPublisher
from .monitor.store import MonitorStore
from .options import check_callable, check_choice, check_has_method, check_int, check_number, invalid
from .reporting import ErrorContext, ErrorHandler, ErrorKindName, ErrorReporter, report_error
from .retrying import RetryBackoff
from .runner import ensure_logging
from .stores.base import AckStore, Checkpoint, DeadLetterStore, ResumeTokenStore, malformed, token_problem
from .stores.mongodb import DEFAULT_COLLECTION, MongoResumeTokenStore
from .stores.records import AckRecord, DeadLetter
from .subscription import OnExhausted, Subscription
from .tracking import Slot, Tracker
from .watcher import TOKEN_MODIFIED, ErrorKind, Position, Watcher, classify_error, explain

__all__ = ["Bus", "BusState", "HistoryLostPolicy", "Ordering"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
Ordering = Literal["document", "stream", "none"]
HistoryLostPolicy = Literal["raise", "restart_from_now"]

_FULL_DOCUMENT_OPTIONS = {FullDocument.UPDATE_LOOKUP, FullDocument.WHEN_AVAILABLE, FullDocument.REQUIRED}
#: Fields dropped when fetching an event too large to send or split.
_LARGE_FIELDS = ("fullDocument", "fullDocumentBeforeChange", "updateDescription")
#: An idle stream's post-batch token is written at most this often (events move it every flush).
IDLE_CHECKPOINT_INTERVAL = 10.0

#: The final checkpoint write at stop() gets at least this many seconds, even when the
#: callbacks used the whole timeout.
FINAL_FLUSH_MIN = 1.0

#: The watcher hands collected work to the workers at least every this many items.
_RELEASE_AT = 64

_UPDATE = OperationType.UPDATE
_REPLACE = OperationType.REPLACE
_INVALIDATE = OperationType.INVALIDATE


def _document_lane(key: Mapping[str, Any], event: ChangeEvent, one_namespace: bool) -> Hashable:
    """What names ``event``'s document (its ``documentKey``, ``key``) in lane keys.

    A subscription's lane is ``(subscription index, this)``, or this alone when the bus
    has one subscription. A plain ``_id`` (str, int or ObjectId, exact types: never a
    bool) stands for itself on a collection bus, which sees one namespace; values of
    different types never compare equal, and the other forms are a tuple or bytes.
    """
    value = key.get("_id") if len(key) == 1 else None
    kind = type(value)
    if kind is str or kind is int or kind is bson.ObjectId:
        return value if one_namespace else (event.database, event.collection, value)
    return (event.database, event.collection, bson.encode(dict(key)))


def _check_bus_options(o: Mapping[str, Any]) -> None:
    """Refuse every bad :class:`Bus` option with a :class:`ConfigurationError` naming it."""
    if o["name"] is not None and not isinstance(o["name"], str):
        raise invalid("name", o["name"], "a str or None")
    check_choice("full_document", o["full_document"], [None, *FullDocument])
    check_choice("full_document_before_change", o["full_document_before_change"], [None, "off", "whenAvailable", "required"])
    for flag in ("full_document_only", "update_description", "include_empty_updates", "show_expanded_events", "resume"):
        if not isinstance(o[flag], bool):
            raise invalid(flag, o[flag], "True or False")
    check_int("max_updated_fields_size", o["max_updated_fields_size"], 0)
    pipeline = o["pipeline"]
    if pipeline is not None and (isinstance(pipeline, (str, bytes, Mapping)) or not isinstance(pipeline, Sequence)):
        raise invalid("pipeline", pipeline, "a list of stages such as [{'$match': ...}]")
    for stage in pipeline or ():
        if not isinstance(stage, Mapping) or len(stage) != 1:
            raise invalid("pipeline", pipeline, f"a list of one-key mappings such as {{'$match': ...}} (bad stage: {stage!r})")
    check_int("batch_size", o["batch_size"], 0, allow_none=True)
    if not isinstance(o["max_await_time"], timedelta):
        check_number("max_await_time", o["max_await_time"])
    elif o["max_await_time"] <= timedelta(0):
        raise invalid("max_await_time", o["max_await_time"], "a positive number of seconds or timedelta")
    store = o["resume_token_store"]
    if store is not None and not isinstance(store, ResumeTokenStore):
        raise invalid("resume_token_store", store, "a mongo_events.ResumeTokenStore (MongoResumeTokenStore, FileResumeTokenStore ...) or None")
    coll = o["resume_token_collection"]
    if coll is not None and not isinstance(coll, (MongoCollection, str)):
        raise invalid("resume_token_collection", coll, "a pymongo Collection, a collection name or None")
    if o["resume_token_id"] is not None and (not isinstance(o["resume_token_id"], str) or not o["resume_token_id"]):
        raise invalid("resume_token_id", o["resume_token_id"], "a non-empty str or None")
    past = o["start_from_past"]
    if past is not None and (not isinstance(past, timedelta) or past <= timedelta(0)):
        raise invalid("start_from_past", past, "a positive datetime.timedelta or None")
    check_int("max_workers", o["max_workers"], 1)
    check_int("max_in_flight", o["max_in_flight"], 1)
    check_choice("ordering", o["ordering"], ["document", "stream", "none"])
    check_number("flush_interval", o["flush_interval"])
    if o["decoder"] is not None:
        check_has_method("decoder", o["decoder"], "decode", "a mongo_events.Decoder")
    middleware = o["middleware"]
    if isinstance(middleware, (str, bytes, Mapping)) or not isinstance(middleware, Sequence) or not all(isinstance(m, Middleware) for m in middleware):
        raise invalid("middleware", middleware, "a list of mongo_events.Middleware instances")
    dead = o["dead_letters"]
    if dead is not None and not isinstance(dead, DeadLetterStore) and not callable(dead):
        raise invalid("dead_letters", dead, "a mongo_events.DeadLetterStore, a function (event, subscription, error, attempts) or None")
    if o["ack_store"] is not None and not isinstance(o["ack_store"], AckStore):
        raise invalid("ack_store", o["ack_store"], "a mongo_events.AckStore (MongoAckStore, MemoryAckStore) or None")
    check_choice("on_history_lost", o["on_history_lost"], ["raise", "restart_from_now"])
    check_callable("history_lost_callback", o["history_lost_callback"], "a function (key, since) or None")
    check_number("start_timeout", o["start_timeout"])
    if o["metrics"] is not None and not isinstance(o["metrics"], Metrics):
        raise invalid("metrics", o["metrics"], "a mongo_events.Metrics or None")
    if o["monitor"] is not None and not isinstance(o["monitor"], (MonitorStore, MonitorMiddleware)):
        raise invalid("monitor", o["monitor"], "a mongo_events.monitor.MonitorStore, a MonitorMiddleware or None")


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
    :param batch_size: the stream's batch size.
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
    :param start_from_past: when no checkpoint exists, start this far in the past.
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
        batch_size: int | None = None,
        max_await_time: float | timedelta = 1.0,
        show_expanded_events: bool = False,
        resume: bool = True,
        resume_token_store: ResumeTokenStore | None = None,
        resume_token_collection: MongoCollection[Any] | str | None = None,
        resume_token_id: str | None = None,
        start_from_past: timedelta | None = None,
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
        #: A collection bus: every event is of one namespace, so lane keys need not name it.
        self._one_namespace = self.level == "collection"
        self._default_db = self._db.name if self.level != "cluster" else ""
        self.name = name or self._namespace

        _check_bus_options(locals())
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
            raise ConfigurationError("resume=False stores no position: drop resume_token_store / resume_token_collection, or resume")

        self.full_document = fd
        self.full_document_before_change = full_document_before_change
        self.full_document_only = full_document_only
        self.update_description = update_description or max_updated_fields_size > 0
        self.include_empty_updates = include_empty_updates
        self.max_updated_fields_size = max_updated_fields_size
        self.pipeline = [dict(s) for s in pipeline or ()]
        self.batch_size = batch_size
        self.max_await_time = max_await_time.total_seconds() if isinstance(max_await_time, timedelta) else float(max_await_time)
        self.show_expanded_events = show_expanded_events
        self.resume = resume
        self.start_from_past = start_from_past
        self.max_workers = max_workers
        self.max_in_flight = max_in_flight
        self.ordering: Ordering = ordering
        self.flush_interval = flush_interval
        self.on_history_lost: HistoryLostPolicy = on_history_lost
        self.history_lost_callback = history_lost_callback
        self.start_timeout = start_timeout
        self._decoder: Decoder = decoder or CattrsDecoder()
        self.metrics = metrics
        self.monitor: MonitorMiddleware | None = MonitorMiddleware(monitor) if isinstance(monitor, MonitorStore) else monitor
        # The monitor runs outermost (it sees what every other hook sees), then metrics.
        self._middleware = [m for m in (self.monitor, metrics) if m is not None] + list(middleware)
        self.on_error = on_error
        if on_error is not None:
            self._middleware.append(ErrorReporter(on_error, self.name))
        self.dead_letter_store = dead_letters if isinstance(dead_letters, DeadLetterStore) else None
        self._dead_letters: DeadLetterHook | None = self._store_dead_letter if self.dead_letter_store is not None else dead_letters  # type: ignore[assignment]
        if on_error is not None and self._dead_letters is not None:
            self._dead_letters = self._reporting_dead_letters(self._dead_letters)
        self.ack_store = ack_store
        self.status: StatusPublisher | None = StatusPublisher(status) if isinstance(status, ConsumerStatusStore) else status
        if self.status is not None:
            self._middleware.append(self.status)  # it counts deliveries for the dashboard
        self.idempotency = _idempotency(idempotency)
        if crash_store is not None and not isinstance(crash_store, IdempotencyStore):
            raise ConfigurationError(f"crash_store must be an IdempotencyStore, got {type(crash_store).__name__}")
        self._crash_counter = CrashCounter(crash_store) if crash_store is not None else None
        self._resume_token_id = resume_token_id or _hostname()

        if not resume:
            self.token_store: ResumeTokenStore | None = None
        elif resume_token_store is not None:
            self.token_store = resume_token_store
        elif isinstance(resume_token_collection, MongoCollection):
            self.token_store = MongoResumeTokenStore(resume_token_collection)
        else:
            self.token_store = MongoResumeTokenStore(self._db[resume_token_collection or DEFAULT_COLLECTION])

        #: Stores written against the older three-argument save() do not get namespace/level.
        self._save_kwargs: dict[str, str] = (
            {"namespace": self._namespace, "level": self.level} if self.token_store is not None and _takes_namespace(self.token_store) else {}
        )
        self._subscriptions: list[Subscription] = []
        self._state = BusState.NEW
        self._state_lock = threading.Lock()
        self._error: BaseException | None = None
        self._pid = os.getpid()
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._stop_event = threading.Event()
        self._stopped = threading.Event()
        # The Condition's own lock, used directly on hot paths: `with self._mutex` runs in C,
        # `with self._cond` goes through two Python-level methods. Holding either is the same.
        self._mutex = threading.RLock()
        self._cond = threading.Condition(self._mutex)
        #: While the watcher waits for room: the window size that wakes it (else -1).
        self._room_low = -1
        #: Threads in _wait_for_done (join(), a barrier): workers notify them on every step.
        self._joining = 0
        #: Runnable items the watcher has not handed to the workers yet (watcher thread only).
        self._runnable: list[WorkItem] = []
        #: No subscription filters events: every event goes to all of them.
        self._unfiltered = all(s.operations is None and not s.full_document_only for s in self._subscriptions)
        #: One subscription: its lanes are keyed by the document alone.
        self._single = len(self._subscriptions) == 1
        self._tracker = Tracker(self.max_in_flight, durable=self.token_store is not None)
        self._connected = threading.Event()
        self._connect_error: BaseException | None = None
        self._saved_version = 0
        self._last_save = 0.0
        self._initial_save = False
        self._acks: dict[str, AckRecord] = {}
        #: Number of ack-store batch writes (for tests and the benchmark).
        self.ack_writes = 0
        self._split = False  # append $changeStreamSplitLargeEvent (after a 10334)
        self._narrow = False  # the server cannot split: read one event per batch to find the big one
        self._stub_next = False  # ... then fetch that event alone, without its documents
        self.oversize_events = 0
        #: Updates that full_document_only subscriptions skipped: their document was gone.
        self.missing_documents = 0
        self._dispatcher: Dispatcher | None = None
        self._watcher: Watcher | None = None
        self._flusher: Flusher | None = None
        self._shutdown_lock = threading.Lock()
        self._signals = 0
        #: Set by a second SIGINT/SIGTERM in run_forever(): stop without waiting for callbacks.
        self._hurry = threading.Event()
        #: Number of resume-token writes (for tests and the benchmark).
        self.token_writes = 0
        self.history_gaps = 0
        #: Streams reopened since start (errors, invalidations, lost history).
        self.reconnections = 0
        self._stream_active = False
        self._persisted_time: int | None = None  # cluster time (s) of the stored checkpoint
        self._last_event: tuple[float, Any, Any] | None = None  # (received at, wall time, cluster time)
        self._newest: ChangeEvent | None = None  # the newest event, until _on_drained notes it
        self._last_error: tuple[str, datetime] | None = None
        self._oplog_oldest: int | None = None
        self._oplog_checked = 0.0

    # -- properties ---------------------------------------------------------------

    @property
    def resume_token_key(self) -> str:
        """``"<db.coll | db.* | *.*>:<resume_token_id>"``, the seed's key format."""
        return f"{self._namespace}:{self._resume_token_id}"

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
        with self._cond:
            return self._tracker.checkpoint  # type: ignore[no-any-return]

    @property
    def in_flight(self) -> int:
        """Events held after the checkpoint, finished or not (at most ``max_in_flight``)."""
        with self._cond:
            return len(self._tracker)

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
                raise ConfigurationError(f"a subscription named {sub.name!r} already exists on bus {self.name!r}; pass name=...")
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
                raise BusStateError(f"bus {self.name!r} is {self._state.value}; start() needs a new, stopped or failed bus")
            if not self._subscriptions:
                raise ConfigurationError(f"bus {self.name!r} has no subscriptions: call subscribe() before start()")
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
        log.info("bus %s started: watching %s, checkpoint key %s", self.name, self._namespace, self.resume_token_key)
        return self

    def _start(self) -> None:
        for store in (self.token_store, self.ack_store, self.dead_letter_store, self.monitor.store if self.monitor else None, *self._idempotency_stores()):
            if store is None:
                continue
            try:
                store.ensure_indexes()
            except StoreError as exc:
                log.warning("could not create indexes for %s (%s); going on without them", type(store).__name__, exc)
                self._report(exc, "store", what=f"create indexes ({type(store).__name__})")
        self._dispatcher = Dispatcher(
            max_workers=self.max_workers,
            decoder=self._decoder,
            middleware=self._middleware,
            on_done=self._on_done,
            on_fatal=self._fail,
            dead_letters=self._dead_letters,
            bus_name=self.name,
            lock=self._mutex,
        )
        self._watcher = Watcher(
            name=self.name,
            open_stream=self._open_stream,
            on_event=self._on_event,
            on_resume_token=self._on_resume_token,
            on_error=self._on_stream_error,
            on_connected=self._on_connected,
            on_opened=self._on_opened,
            on_reconnect=self._on_reconnect,
            on_active=self._on_active,
            on_drained=self._on_drained,
            on_fatal=self._fail,
            stop_event=self._stop_event,
        )
        tasks = [self._flush_events]
        if self.monitor is not None:
            tasks.append(self._reporting_task(self.monitor.flush, "write monitor entries"))
        if self.metrics is not None:
            tasks.append(self._refresh_oplog_window)
        self._flusher = Flusher(tasks, self.flush_interval, self.name, on_fatal=self._fail)
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
        self._watcher.start(position)
        if self._connected.wait(self.start_timeout):
            if self._connect_error is not None:
                raise self._connect_error
        else:
            # Web apps start at boot and must not hang on a server that is down: keep trying in
            # the background, but loudly: ERROR here and at each retry, health "unhealthy".
            message = f"the change stream on {self._namespace} did not open within {self.start_timeout:.0f}s; still trying in the background"
            self._last_error = (message, datetime.now(timezone.utc))
            log.error("bus %s: %s; health is unhealthy and nothing is delivered until it opens", self.name, message)

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
            log.warning("bus %s: stop() in forked process %d ignored: the bus runs in process %d", self.name, os.getpid(), self._pid)
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
        log.warning(
            "bus %s: got signal %d; %s", self.name, signum,
            "stopping gracefully (a second signal stops without waiting for callbacks)" if self._signals == 1
            else "stopping now: no more waiting for callbacks, one bounded checkpoint write",
        )
        self._stop_event.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every event received so far is done; returns False on timeout.

        :raises MongoEventsError: the error that made the bus fail, if it did.
        """
        self._check_pid()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if not self._wait_for_done(self._tracker.last_seq, deadline, lambda: self._error is not None or self._stopped.is_set()):
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
            raise BusStateError("stop the bus before reset_resume_token(): a running bus writes its position again")
        if self.token_store is not None:
            self.token_store.delete(self.resume_token_key)
            log.info("bus %s: resume token %s reset", self.name, self.resume_token_key)

    def __enter__(self) -> Bus:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
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
        if self.token_store is not None:
            checkpoint = self.token_store.load(self.resume_token_key)
            if checkpoint is not None:
                self._check_checkpoint(checkpoint)
                with self._cond:
                    self._tracker.checkpoint = checkpoint.token
                    self._tracker.checkpoint_time = checkpoint.cluster_time
                self._persisted_time = _seconds(checkpoint.cluster_time, checkpoint.token)
                log.info("bus %s resumes after its checkpoint (cluster time %s)", self.name, checkpoint.cluster_time)
                return Position(resume_after=checkpoint.token)
            self._initial_save = True
        if self.start_from_past is not None:
            since = datetime.now(timezone.utc) - self.start_from_past
            log.info("bus %s has no checkpoint; starting from %s", self.name, since.isoformat())
            return Position(start_at_operation_time=Timestamp(since, 0))
        return Position()

    def _check_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Refuse a stored checkpoint that is malformed or belongs to another namespace."""
        key, where = self.resume_token_key, type(self.token_store).__name__
        problem = token_problem(checkpoint.token)
        if problem is not None:
            raise malformed(key, where, problem)
        if (checkpoint.namespace is not None and checkpoint.namespace != self._namespace) or (
            checkpoint.level is not None and checkpoint.level != self.level
        ):
            raise StoreError(
                f"bus {self.name!r}: the stored checkpoint {key!r} in {where} was written by a bus watching "
                f"{checkpoint.namespace} ({checkpoint.level} watch), but this bus watches {self._namespace} "
                f"({self.level} watch): resuming there would deliver another stream's changes or skip this one's. "
                "It was left untouched. Give this bus its own resume_token_id, or reset_resume_token() if the "
                "target was renamed on purpose"
            )

    def _fail(self, exc: BaseException) -> None:
        """Stop the bus because of ``exc``: state FAILED, ``error`` set, one ERROR line."""
        with self._state_lock:
            if self._error is not None or self._state in (BusState.STOPPED, BusState.FAILED):
                return
            self._error = exc
        log.error("bus %s failed: %s", self.name, describe(exc), exc_info=exc if isinstance(exc, ThreadFailed) else None)
        if not self._connected.is_set():  # start() is waiting for the stream: it raises this
            self._connect_error = exc
            self._connected.set()
        self._stop_event.set()
        with self._cond:
            self._cond.notify_all()
        threading.Thread(target=self._stop_after_failure, name=f"mongo_events.stopper[{self.name}]", daemon=True).start()

    def _stop_after_failure(self) -> None:
        try:
            self._shutdown(30.0, quiet=True)
        except BaseException as exc:  # the bus is FAILED already (see _shutdown); say what else broke
            log.error("bus %s: stopping after the failure also failed: %s", self.name, describe(exc), exc_info=exc)

    def _shutdown(self, timeout: float, quiet: bool = False) -> None:
        """Stop every thread and write the final checkpoint, within ``timeout`` (plus at most
        ``FINAL_FLUSH_MIN`` for the final write when the callbacks used the whole timeout).

        ``_hurry`` (a second signal in ``run_forever()``) cuts the waits for callbacks short.
        """
        running: list[str] = []
        with self._shutdown_lock:
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
                with self._cond:
                    self._cond.notify_all()
            log.info("bus %s %s; checkpoint %s", self.name, self._state.value, self._tracker.checkpoint)
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
        with self._cond:
            self._cond.notify_all()
        if self._watcher is not None:
            # It ends within one getMore (max_await_time) unless it is stuck in the driver, for
            # instance in server selection; a second signal stops waiting for it.
            watcher_deadline = max(deadline, time.monotonic() + self.max_await_time + 1.0)
            while not self._watcher.join(min(0.1, watcher_deadline - time.monotonic())):
                if hurry.is_set() or time.monotonic() >= watcher_deadline:
                    break
        running: list[str] = []
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
                    self.name, grace - now, self._last_error[0] if self._last_error else "no error recorded",
                )
        if self.metrics is not None:
            try:
                self.metrics.detach(self)
            except Exception:
                log.exception("bus %s: detaching metrics failed", self.name)
        for store in (self.token_store, self.ack_store, self.dead_letter_store, self.monitor.store if self.monitor else None):
            if store is not None:
                try:
                    store.close()
                except Exception:
                    log.exception("closing %s failed", type(store).__name__)
        return running

    # -- internals: watcher side ----------------------------------------------------------

    def _open_stream(self, position: Position) -> ChangeStream[Any]:
        kwargs: dict[str, Any] = position.kwargs()
        if self.full_document is not None:
            kwargs["full_document"] = self.full_document.value
        if self.full_document_before_change is not None:
            kwargs["full_document_before_change"] = self.full_document_before_change
        if self.show_expanded_events:
            kwargs["show_expanded_events"] = True
        pipeline = self._own_filter() + self.pipeline
        batch_size = self.batch_size
        if self._stub_next:
            pipeline.append({"$project": dict.fromkeys(_LARGE_FIELDS, 0)})
        elif self._split:
            pipeline.append({"$changeStreamSplitLargeEvent": {}})
        if self._narrow:
            batch_size = 1
        return self._target.watch(
            pipeline or None,
            batch_size=batch_size,
            max_await_time_ms=int(self.max_await_time * 1000),
            **kwargs,
        )

    def _own_filter(self) -> list[dict[str, Any]]:
        """A database or cluster watch must not see the bus's own checkpoint writes."""
        store = self.token_store
        if self.level == "collection" or not isinstance(store, MongoResumeTokenStore):
            return []
        coll = store.collection
        if self.level == "database" and coll.database.name != self._db.name:
            return []
        return [{"$match": {"$nor": [{"ns.db": coll.database.name, "ns.coll": coll.name}]}}]

    def _on_opened(self, stream: ChangeStream[Any]) -> bool:
        """Persist where a first-ever stream opened, before ``start()`` returns.

        Without this, a bus that fails before its first checkpoint write would
        restart "from now" and skip what happened in between.
        """
        if not self._initial_save or self.token_store is None:
            return True
        token = stream.resume_token  # the post-batch token of an empty first batch, else None
        if token is None:
            return True  # history arrived in the first batch (start_from_past): nothing to pin
        try:
            self.token_store.save(self.resume_token_key, token, None, **self._save_kwargs)
        except StoreError as exc:
            self._report(exc, "store", what="write the opening position")
            self._on_connected(exc)
            self._fail(exc)
            return False
        self._initial_save = False
        self.token_writes += 1
        self._persisted_time = token_time(token)
        with self._cond:
            self._tracker.note_resume_token(token)
            self._saved_version = self._tracker.version
        return True

    def _on_connected(self, error: BaseException | None) -> None:
        if error is not None:
            self._connect_error = self._translate(error)
        self._connected.set()

    def _translate(self, exc: BaseException) -> BaseException:
        if isinstance(exc, MongoEventsError):
            return exc
        kind = classify_error(exc)
        if getattr(exc, "code", None) == TOKEN_MODIFIED:
            message = (
                f"bus {self.name!r}: the change stream on {self._namespace} failed because its pipeline modified "
                "or removed _id, which carries each event's resume token (server said: "
                f"{exc}). Change-stream pipelines must not modify or remove _id: keep it in every $project, "
                "$addFields, $set, $unset or $replaceRoot stage"
            )
            # Before any event, it is a configuration mistake; later, the stream failed mid-way.
            if self._tracker.last_seq == 0:
                err: MongoEventsError = ConfigurationError(message)
            else:
                err = StreamError(message, key=self.resume_token_key)
        elif kind is ErrorKind.CONFIGURATION:
            err = ConfigurationError(f"bus {self.name!r} cannot watch {self._namespace}: {explain(exc)}")
        elif kind is ErrorKind.HISTORY_LOST:
            err = self._history_lost_error(exc)
        else:
            err = StreamError(f"bus {self.name!r}: change stream on {self._namespace} failed: {exc}", key=self.resume_token_key)
        err.__cause__ = exc
        return err

    def _history_lost_error(self, exc: BaseException) -> ResumeTokenLost:
        since = self._tracker.checkpoint_time
        return ResumeTokenLost(
            f"bus {self.name!r}: the resume point {self.resume_token_key} (checkpoint cluster time {since}) "
            f"can no longer be resumed: {exc}. Events after it may be gone from the oplog. Decide, then either "
            f"reset_resume_token() to start from now, or pass on_history_lost='restart_from_now'",
            key=self.resume_token_key,
            since=since,
        )

    def _on_stream_error(self, kind: ErrorKind, exc: BaseException, position: Position) -> Position | None:
        if kind is ErrorKind.OVERSIZE and not (self._split or self._narrow or self._stub_next):
            log.warning(
                "bus %s: an event on %s exceeds 16 MB (%s); reopening with $changeStreamSplitLargeEvent to receive it in fragments",
                self.name, self._namespace, exc,
            )
            self._split = True
            return position
        if kind is ErrorKind.CONFIGURATION and self._split and getattr(exc, "code", None) == 40324:
            # The failed batch may also hold ordinary events before the big one: read one
            # event per batch until the big one fails again, so we know exactly which it is.
            log.warning("bus %s: the server cannot split large events (needs MongoDB 6.0.9+ or 7.0); finding the oversize event", self.name)
            self._split = False
            self._narrow = True
            return position
        if kind is ErrorKind.OVERSIZE and self._narrow:
            self._stub_next = True  # the very next event is the oversize one: fetch it without documents
            return position
        if kind is ErrorKind.HISTORY_LOST and self.on_history_lost == "restart_from_now" and position.kwargs():
            since = self._tracker.checkpoint_time
            self.history_gaps += 1
            log.error(
                "bus %s: resume point %s lost (%s); restarting from now: changes since %s are skipped",
                self.name, self.resume_token_key, exc, since,
            )
            if self.history_lost_callback is not None:
                try:
                    self.history_lost_callback(self.resume_token_key, since)
                except Exception:
                    log.exception("history_lost_callback failed")
            return Position()
        error = self._translate(exc)
        self._report(error, "stream", what=f"{kind.value} error; the bus stops")
        if not self._connected.is_set():
            self._on_connected(error)
        self._fail(error)
        return None

    def _on_event(self, raw: Mapping[str, Any]) -> bool:
        # The hot path: one call per event on the watcher thread. Written to do little
        # beyond what the semantics need (attribute reads hoisted, helpers inlined), since
        # each call or allocation here is a visible share of the per-event cost.
        event = ChangeEvent.from_raw(raw, self._default_db, self._default_coll)
        self._newest = event  # health() learns of it once per batch (see _on_drained)
        if self.metrics is not None:
            self.metrics.received(self._namespace, event.wall_time, event.cluster_time)
        if self._stub_next:
            return self._on_oversize_stub(event)
        desc = event.update_description
        op = event.operation_type
        if (
            desc is not None
            and self.max_updated_fields_size
            and desc.updated_fields
            and len(bson.encode(dict(desc.updated_fields))) > self.max_updated_fields_size
        ):
            desc = attrs.evolve(desc, updated_fields={}, updated_fields_dropped=True)
            event = attrs.evolve(event, update_description=desc)
        subs: Sequence[Subscription]
        if op is _UPDATE and not self.include_empty_updates and (desc is None or desc.is_empty):
            subs = ()
        elif self._unfiltered:
            subs = self._subscriptions  # nobody filters: no list per event
        else:
            subs = [s for s in self._subscriptions if s.wants(event)]
            if self.full_document_only and event.full_document is None and (op is _UPDATE or op is _REPLACE):
                # updateLookup found no document (deleted since): nothing to hand over. Say so.
                self.missing_documents += 1
                log.warning(
                    "bus %s: %s of %s %s has no full document (deleted before the lookup); "
                    "full_document_only subscriptions skip it (%d so far)",
                    self.name, op, event.namespace, event.document_key, self.missing_documents,
                )
        token = None if op is _INVALIDATE else raw["_id"]
        ordering = self.ordering
        doc_lane: Hashable | None = None
        lane: Hashable | None
        barrier = False
        if subs and ordering == "document":
            key = event.document_key
            if not key:
                # A namespace-wide event (drop, rename, dropDatabase, invalidate, DDL) concerns
                # every document: it runs after all earlier events and before any later one.
                barrier = True
                doc_lane = (event.database, event.collection)
            else:
                doc_lane = _document_lane(key, event, self._one_namespace)
        dispatcher = self._dispatcher
        assert dispatcher is not None
        tracker = self._tracker
        with self._mutex:
            if dispatcher._done:  # drain()'s own test, read here: most events find nothing done
                dispatcher.drain()
            if barrier and not self._wait_until_idle():
                return False
            if tracker.full and not self._wait_for_room():
                return False
            slot = tracker.begin(token, event.cluster_time, len(subs), event.id)
            if not subs:
                tracker.advance()
                if self._joining:
                    self._cond.notify_all()
                return True
            if self.ack_store is not None:
                self._acks[event.id] = AckRecord(event.id, datetime.now(timezone.utc))
            delivered_desc = desc if self.update_description else None
            runnable = self._runnable  # read after any wait for room: that wait releases it
            if self._single:  # the common case, spelled out: its document alone names its lane
                sub = subs[0]
                lane = doc_lane if doc_lane is not None else (sub.index if ordering == "stream" else None)
                work = WorkItem(sub, event, slot, lane, delivered_desc)
                if lane is None or dispatcher._lanes.push(lane, work) is not None:
                    runnable.append(work)
            else:
                for sub in subs:
                    if doc_lane is not None:
                        lane = (sub.index, doc_lane)
                    else:
                        lane = sub.index if ordering == "stream" else None
                    item = dispatcher.admit(WorkItem(sub, event, slot, lane, delivered_desc))
                    if item is not None:
                        runnable.append(item)
            if barrier and not self._wait_until_idle():  # later events wait for it to finish
                return False
        if len(runnable) >= _RELEASE_AT:
            self._release_runnable()
        return True

    def _on_drained(self) -> None:
        """The watcher read all it holds: hand the collected items on; note the newest event."""
        self._release_runnable()
        event = self._newest
        if event is not None:
            self._newest = None
            self._last_event = (time.time(), event.wall_time, event.cluster_time)

    def _release_runnable(self) -> None:
        """Hand the runnable items the watcher collected to the workers.

        The watcher collects them while pymongo holds more events in memory and releases
        them when its batch is drained (or every ``_RELEASE_AT`` items, or before waiting
        for room): a worker is then woken once per run of events, not once per event,
        which is most of the cost of a thread hand-off in CPython.
        """
        items = self._runnable
        if items:
            self._runnable = []
            dispatcher = self._dispatcher
            assert dispatcher is not None
            for item in items:
                dispatcher.enqueue(item)

    def _wait_for_room(self) -> bool:
        """The window is full: wait (holding ``_cond``) until a quarter of it is free again.

        Waking at every single free slot would cost a thread switch per event; the
        low-water mark lets the watcher admit a run of events per wake-up. Done events
        that only wait on a checkpoint write are freed by a flush, so the flusher is
        woken here, when the window is truly full, and not earlier: that keeps checkpoint
        writes to about one per ``max_in_flight`` events. False when stopping.
        """
        tracker = self._tracker
        self._release_runnable()  # the window can only drain if the workers have its items
        self._room_low = tracker.capacity - max(1, min(tracker.capacity // 4, 256))
        try:
            while self._drained() > self._room_low:
                if self._stop_event.is_set():
                    return False
                if tracker.unflushed and len(tracker) - tracker.unflushed <= self._room_low and self._flusher is not None:
                    self._flusher.wake()  # a write frees enough room now (else _on_done wakes it later)
                self._cond.wait(0.1)
        finally:
            self._room_low = -1
        return True

    def _wait_until_idle(self) -> bool:
        """Wait (holding ``_cond``) until every admitted event is done; False when stopping.

        The barrier around a namespace-wide event under ``ordering="document"``. Such
        events are rare (DDL), so the watcher simply waits; retries and slow callbacks
        hold it as a full window would.
        """
        self._release_runnable()  # the workers need the items the watcher still holds
        self._wait_for_done(self._tracker.last_seq, None, self._stop_event.is_set)
        return not self._stop_event.is_set()

    def _wait_for_done(self, target: int, deadline: float | None, give_up: Callable[[], bool]) -> bool:
        """Wait (holding ``_cond``) until every event up to sequence ``target`` is done, or
        ``give_up()``; False only when ``deadline`` (a ``time.monotonic()`` value) passed."""
        self._joining += 1  # workers notify on every step while someone waits here
        try:
            while True:
                self._drained()
                first = self._tracker.first_seq()
                if first is None or first > target or give_up():
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(0.1 if remaining is None else min(0.1, remaining))
        finally:
            self._joining -= 1

    def _on_oversize_stub(self, event: ChangeEvent) -> bool:
        """The event the server could neither send nor split, without its documents: dead-letter it."""
        self._stub_next = self._narrow = False
        self.oversize_events += 1
        error = StreamError(
            f"change event {event.id} ({event.operation_type} {event.namespace} {event.document_key}) exceeds 16 MB "
            "and the server cannot split it; only its key and token were kept",
            key=self.resume_token_key,
        )
        if self._dead_letters is None:
            self._fail(StreamError(f"bus {self.name!r}: {error}; configure dead_letters to record it and go on", key=self.resume_token_key))
            return False
        try:
            self._dead_letters(event, f"{self.name}:oversize", error, 1)
        except Exception as exc:  # (a failure is already reported to on_error by the wrapped hook)
            self._fail(StreamError(f"bus {self.name!r}: could not dead-letter oversize event {event.id}: {exc}", key=self.resume_token_key))
            return False
        log.error("bus %s: %s; dead-lettered as a stub", self.name, error)
        if self.metrics is not None:
            self.metrics.dead_letter_stored(f"{self.name}:oversize")
        with self._cond:
            self._tracker.begin(event.resume_token, event.cluster_time, 0, event.id)
            self._tracker.advance()
            self._cond.notify_all()
        if self._watcher is not None:
            self._watcher.request_reopen()  # back to full events after it
        return True

    def _on_resume_token(self, token: Mapping[str, Any] | None) -> None:
        with self._mutex:
            self._drained()
            self._tracker.note_resume_token(token)

    def _drained(self) -> int:
        """Report what workers finished but could not report yet; returns the window size.

        Caller holds ``_cond``. Workers report without waiting for the lock (see
        ``Dispatcher.drain``), so whoever holds it next does it for them.
        """
        if self._dispatcher is not None:
            self._dispatcher.drain()
        return len(self._tracker)

    # -- internals: worker and flusher side ---------------------------------------------------

    def _on_done(self, slots: list[Slot]) -> None:
        """Subscriptions finished these slots; the dispatcher calls this holding ``_cond``."""
        tracker = self._tracker
        acks = self._acks if self.ack_store is not None else None
        finish = tracker.finish
        for slot in slots:
            finish(slot)
            if acks is not None and slot.remaining <= 0:
                pending = acks.get(slot.event_id)
                now = datetime.now(timezone.utc)
                acks[slot.event_id] = AckRecord(slot.event_id, pending.created_at if pending else now, now)
        if tracker.head_done:
            tracker.advance()
            if self._joining:
                self._cond.notify_all()
            elif self._room_low >= 0:  # the watcher waits for room
                size = len(tracker)
                if size <= self._room_low:
                    self._cond.notify_all()
                elif size - tracker.unflushed <= self._room_low and self._flusher is not None:
                    # Only a checkpoint write can free the room it waits for: write now.
                    self._flusher.wake()

    def _store_dead_letter(self, event: ChangeEvent, subscription: str, error: BaseException, attempts: int) -> None:
        store = self.dead_letter_store
        assert store is not None
        store.store(
            DeadLetter(
                id=str(ObjectId()),
                event_name=subscription,
                original_id=event.id,
                payload=dict(event.raw),
                metadata={
                    "bus": self.name,
                    "namespace": event.namespace,
                    "operation": str(event.operation_type),
                    "document_key": event.document_key,
                    "cluster_time": event.cluster_time,
                    "resume_token_key": self.resume_token_key,
                },
                error=f"{type(error).__name__}: {error}",
                retry_count=attempts - 1,  # retries, as in the monitor entry (and Go's RetryCount)
                source=self.name,
                created_at=datetime.now(timezone.utc),
            )
        )

    # -- observability ----------------------------------------------------------------------

    def _on_active(self, active: bool) -> None:
        self._stream_active = active
        if self.metrics is not None:
            (self.metrics.stream_opened if active else self.metrics.stream_closed)(self._namespace)

    def _on_reconnect(self, reason: str, exc: BaseException | None) -> None:
        self.reconnections += 1
        if exc is not None:
            self._last_error = (f"{type(exc).__name__}: {exc}", datetime.now(timezone.utc))
            self._report(exc, "stream", what=f"reconnect ({reason})")
        if self.metrics is not None:
            self.metrics.reconnected(self._namespace, reason)

    def pending_count(self) -> int:
        """Events this bus received and has not finished yet (some subscription still owes them).

        Process-local, like the Go library's gauge, so summing it over instances is right.
        Across processes, ask the ack store: ``bus.ack_store.pending_count()``.
        """
        with self._mutex:
            self._drained()
            return self._tracker.unfinished

    def checkpoint_age(self) -> float | None:
        """Seconds from the cluster time of the stored checkpoint to now (``None`` before one)."""
        if self._persisted_time is None:
            return None
        return max(0.0, time.time() - self._persisted_time)

    def oplog_headroom(self) -> float | None:
        """Seconds of oplog between its oldest entry and the stored checkpoint: roughly how long
        the bus may stay down before it cannot resume. ``None`` when the oplog cannot be read
        (no permission on ``local``, a mongos) or before the first checkpoint."""
        if self._oplog_oldest is None or self._persisted_time is None:
            return None
        return float(self._persisted_time - self._oplog_oldest)

    def _refresh_oplog_window(self, max_age: float = 30.0) -> None:
        """Read the oldest oplog entry's time, at most every ``max_age`` seconds."""
        now = time.monotonic()
        if now - self._oplog_checked < max_age:
            return
        self._oplog_checked = now
        try:
            oldest = self._db.client["local"]["oplog.rs"].find_one({}, sort=[("$natural", 1)], projection={"ts": 1})
        except PyMongoError as exc:
            log.info("bus %s: cannot read local.oplog.rs (%s); oplog headroom is not reported (next try in 10 min)", self.name, exc)
            self._oplog_oldest = None
            self._oplog_checked = now + 600.0  # not allowed now is unlikely to change soon
            return
        ts = oldest.get("ts") if oldest else None
        self._oplog_oldest = ts.time if isinstance(ts, Timestamp) else None

    def health(self) -> Health:
        """A snapshot for health probes (also served as ``GET /v1/health`` by the monitor app)."""
        self._check_pid()
        state = self._state
        if self.metrics is None:
            try:
                self._refresh_oplog_window()
            except Exception:  # a health probe must answer
                log.exception("bus %s: oplog window check failed", self.name)
        last_event_at = lag = None
        if self._last_event is not None:
            received, wall, cluster_time = self._last_event
            last_event_at = datetime.fromtimestamp(received, timezone.utc)
            if wall is not None:
                wall = wall if wall.tzinfo else wall.replace(tzinfo=timezone.utc)
                lag = max(0.0, received - wall.timestamp())
            elif isinstance(cluster_time, Timestamp):
                lag = max(0.0, received - cluster_time.time)
        error = self._last_error
        if self._error is not None:
            error = (f"{type(self._error).__name__}: {self._error}", error[1] if error else datetime.now(timezone.utc))
        watcher = self._watcher
        if state is not BusState.RUNNING or (watcher is not None and not watcher.opened):
            # Not running, or running but its stream never opened: nothing is delivered at all.
            status: Literal["healthy", "degraded", "unhealthy"] = "unhealthy"
            if error is None and state is BusState.RUNNING:
                error = (f"the change stream on {self._namespace} has not opened yet", datetime.now(timezone.utc))
        elif not self._stream_active or (error is not None and (datetime.now(timezone.utc) - error[1]).total_seconds() < 60):
            status = "degraded"
        else:
            status = "healthy"
        return Health(
            status=status,
            state=state.value,
            stream_active=self._stream_active,
            namespace=self._namespace,
            last_event_at=last_event_at,
            lag=lag,
            checkpoint_age=self.checkpoint_age(),
            oplog_headroom=self.oplog_headroom(),
            pending=self.pending_count(),
            in_flight=self.in_flight,
            reconnections=self.reconnections,
            last_error=error[0] if error else None,
            last_error_at=error[1] if error else None,
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
            raise ConfigurationError(f"bus {self.name!r} has no subscription {letter.event_name!r} to replay dead letter {letter.id}")
        event = ChangeEvent.from_raw(letter.payload, self._db.name if self.level != "cluster" else "", self._default_coll)
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

    def _flush_events(self) -> None:
        """Write ack records, then the checkpoint, both taken in one snapshot.

        Taking both under one lock hold means every event the written checkpoint covers
        has its ack record in the batch written before it: a crash between the two
        writes leaves acks ahead of the checkpoint (harmless), never behind it.
        """
        with self._cond:
            checkpoint = self._checkpoint_to_write()
            acks = self._acks
            self._acks = {}
        try:
            if acks:
                self._write_acks(acks)
            if checkpoint is not None:
                self._write_checkpoint(checkpoint)
        except Exception:
            if checkpoint is not None:  # not stored: the next flush writes it
                with self._cond:
                    self._tracker.moved_by_events = self._tracker.moved_by_events or checkpoint.moved_by_events
            raise

    def _write_acks(self, batch: dict[str, AckRecord]) -> None:
        store = self.ack_store
        assert store is not None
        try:
            store.write(list(batch.values()))
        except Exception as exc:
            self._last_error = (f"{type(exc).__name__}: {exc}", datetime.now(timezone.utc))
            self._report(exc, "store", what=f"write {len(batch)} ack record(s)")
            with self._cond:  # put them back; anything newer for the same event wins
                batch.update(self._acks)
                self._acks = batch
            raise
        self.ack_writes += 1

    def _checkpoint_to_write(self) -> _Checkpoint | None:
        """The checkpoint a flush should write now, or None (caller holds ``_cond``)."""
        self._drained()
        if self.token_store is None:
            return None
        tracker = self._tracker
        if tracker.version == self._saved_version or tracker.checkpoint is None:
            return None
        by_events = tracker.moved_by_events
        if not by_events and time.monotonic() - self._last_save < IDLE_CHECKPOINT_INTERVAL and not self._stop_event.is_set():
            return None  # only the idle post-batch token moved: write it now and then, not every flush
        tracker.moved_by_events = False
        return _Checkpoint(tracker.checkpoint, tracker.checkpoint_time, tracker.version, tracker.unflushed, by_events)

    def _write_checkpoint(self, checkpoint: _Checkpoint) -> None:
        store = self.token_store
        assert store is not None
        token, cluster_time = checkpoint.token, checkpoint.cluster_time
        try:
            store.save(self.resume_token_key, token, cluster_time, **self._save_kwargs)
        except Exception as exc:
            self._last_error = (f"{type(exc).__name__}: {exc}", datetime.now(timezone.utc))
            self._report(exc, "store", what="write checkpoint")
            raise
        self._saved_version = checkpoint.version
        self._last_save = time.monotonic()
        self._persisted_time = _seconds(cluster_time, token)
        self.token_writes += 1
        with self._cond:
            self._tracker.persisted(checkpoint.covered)
            self._cond.notify_all()

    # -- on_error ------------------------------------------------------------------------------

    def _report(self, error: BaseException, kind: ErrorKindName, *, event_id: str | None = None, what: str = "") -> None:
        """Tell ``on_error`` (if any) about an error; see :mod:`mongo_events.reporting`."""
        if self.on_error is not None:
            report_error(self.on_error, error, ErrorContext(kind, self.name, None, event_id, None, what))

    def _reporting_dead_letters(self, hook: DeadLetterHook) -> DeadLetterHook:
        """``hook``, reporting its failures (kind ``dead_letter``) before they propagate."""
        on_error = self.on_error

        def store(event: ChangeEvent, subscription: str, error: BaseException, attempts: int) -> None:
            try:
                hook(event, subscription, error, attempts)
            except Exception as exc:
                report_error(on_error, exc, ErrorContext("dead_letter", self.name, subscription, event.id, attempts, "store dead letter"))
                raise

        return store

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


class _Checkpoint(NamedTuple):
    """A checkpoint taken for writing: what the store gets, and what to book once it is stored."""

    token: Any
    cluster_time: Any
    version: int  # the tracker's version it was taken at
    covered: int  # events it stores past the previous stored checkpoint
    moved_by_events: bool  # finished events moved it (not only an idle post-batch token)


def _seconds(cluster_time: Any, token: Any) -> int | None:
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


def _idempotency(value: IdempotencyStore | Idempotency | None) -> Idempotency | None:
    if value is None or isinstance(value, Idempotency):
        return value
    if isinstance(value, IdempotencyStore):
        return Idempotency(value)
    raise ConfigurationError(f"idempotency must be an IdempotencyStore or an Idempotency, got {type(value).__name__}")


def _hostname() -> str:
    try:
        return socket.gethostname() or "default"
    except OSError:
        return "default"
