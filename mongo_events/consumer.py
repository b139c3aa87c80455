"""The stream consumer: one change stream, from one position, with one checkpoint key.

It owns the watcher that reads the stream, the window its events are admitted into and
the checkpointer that stores its position. Events go one way: watcher -> :meth:`on_event`
(decode, filter, lane, admit into the window) -> the dispatcher's workers -> the window's
``finish`` (called by the dispatcher) -> the flusher running :meth:`Checkpointer.flush`.
Nothing calls back into the bus except the two lifecycle callables it passes in:
``fail`` (stop the bus with this error) and ``report`` (tell ``on_error``).

A bus holds one consumer today; a consumer-group member will hold one per partition,
each with its own key and window.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import attrs
import bson
from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp
from pymongo import MongoClient
from pymongo.change_stream import ChangeStream
from pymongo.collection import Collection as MongoCollection
from pymongo.database import Database

from .checkpointing import Checkpointer
from .dispatch import STREAM_LANE, CoalescingLanes, DeadLetterHook, Dispatcher, FanOut, WorkItem
from .errors import ConfigurationError, MongoEventsError, ResumeTokenLost, StoreError, StreamError
from .events import ChangeEvent, FullDocument, OperationType, decoded
from .health import OplogWindow
from .history import oplog_oldest, rewind_time
from .metrics import Metrics
from .snapshot import SnapshotProgress, SnapshotRunner, parse_progress, snapshot_targets
from .stores.base import AckStore, Checkpoint, ResumeTokenStore, malformed, token_problem
from .stores.mongodb import MongoResumeTokenStore
from .stores.records import AckRecord
from .subscription import Subscription
from .watcher import TOKEN_MODIFIED, ErrorKind, Position, Watcher, classify_error, explain
from .window import Window

__all__ = ["StreamConsumer", "StreamSpec"]

log = logging.getLogger(__name__)

#: Fields dropped when fetching an event too large to send or split.
_LARGE_FIELDS = ("fullDocument", "fullDocumentBeforeChange", "updateDescription")

#: The watcher hands collected work to the workers at least every this many items.
_RELEASE_AT = 64

_UPDATE = OperationType.UPDATE
_REPLACE = OperationType.REPLACE
_INVALIDATE = OperationType.INVALIDATE

Report = Callable[..., None]


@attrs.frozen
class StreamSpec:
    """What one stream consumer reads and how it delivers (the bus's validated options)."""

    name: str
    target: MongoCollection[Any] | Database[Any] | MongoClient[Any]
    level: str
    namespace: str
    default_db: str
    default_coll: str | None
    db_name: str
    client: MongoClient[Any]
    resume_token_key: str
    full_document: FullDocument | None
    full_document_before_change: str | None
    full_document_only: bool
    update_description: bool
    include_empty_updates: bool
    max_updated_fields_size: int
    pipeline: list[dict[str, Any]]
    batch_size: int | None
    max_await_time: float
    show_expanded_events: bool
    start_from_past: timedelta | Literal["all"] | None
    max_in_flight: int
    ordering: str
    on_history_lost: str
    history_lost_callback: Callable[[str, Timestamp | None], None] | None
    snapshot: str | None = None
    snapshot_collections: Sequence[str] | None = None
    snapshot_filter: Mapping[str, Any] | None = None
    snapshot_batch_size: int = 1000
    coalesce: bool = False
    #: A consumer-group partition without a checkpoint starts here (the cluster time the
    #: group was created), not "now": a previous owner may have died before its first write.
    group_start: Timestamp | None = None


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


class StreamConsumer:
    """Reads one change stream into its window and stores its checkpoint.

    :param spec: what to read and how.
    :param subscriptions: the bus's subscriptions (fixed while it runs).
    :param token_store: where the checkpoint lives (``None``: ``resume=False``).
    :param ack_store: where ack records go, if anywhere.
    :param dead_letters: the dispatcher's dead-letter hook (for oversize stubs too).
    :param metrics: OpenTelemetry instruments, if any.
    :param stop_event: the bus's stop flag (the watcher and every window wait end on it).
    :param fail: stops the bus with an error (a lifecycle callable of the bus).
    :param report: ``report(error, kind, what=...)`` tells ``on_error``.
    :param keep: a consumer group's client-side partition filter: a raw change it refuses
        counts as done at once (its position still advances).
    :param gate: a consumer group's lease check: once False, the watcher stops and admits nothing.
    """

    def __init__(
        self,
        spec: StreamSpec,
        subscriptions: Sequence[Subscription],
        *,
        token_store: ResumeTokenStore | None,
        ack_store: AckStore | None,
        dead_letters: DeadLetterHook | None,
        metrics: Metrics | None,
        stop_event: threading.Event,
        fail: Callable[[BaseException], None],
        report: Report,
        keep: Callable[[Mapping[str, Any]], bool] | None = None,
        gate: Callable[[], bool] | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._namespace = spec.namespace
        self._subscriptions = list(subscriptions)
        self.token_store = token_store
        self.ack_store = ack_store
        self._dead_letters = dead_letters
        self.metrics = metrics
        self._stop = stop_event
        self._fail = fail
        self._report = report
        self._keep = keep
        self._gate = gate
        # Options read per event, copied to plain attributes once (one lookup each, as before).
        self._default_db = spec.default_db
        self._default_coll = spec.default_coll
        self._one_namespace = spec.level == "collection"
        self.max_updated_fields_size = spec.max_updated_fields_size
        self.include_empty_updates = spec.include_empty_updates
        self.full_document_only = spec.full_document_only
        self.update_description = spec.update_description
        self.ordering = spec.ordering
        #: No subscription filters events: every event goes to all of them.
        self._unfiltered = all(s.operations is None and not s.full_document_only for s in self._subscriptions)
        #: One subscription: its lanes are keyed by the document alone.
        self._single = len(self._subscriptions) == 1
        #: The target reads changes as RawBSONDocument: events decode each field when it is
        #: first read, with these options (the target's, as plain dicts). Else None.
        options = spec.target.codec_options
        self._raw_options = (
            options.with_options(document_class=dict)
            if issubclass(options.document_class, RawBSONDocument)
            else None
        )

        self.window = Window(
            spec.max_in_flight,
            durable=token_store is not None,
            acks=ack_store is not None,
            stop_event=stop_event,
        )
        # The window's lock and tracker, hoisted at construction: the hot path reads one
        # attribute for each, as it did when they lived on the bus.
        self._mutex = self.window.mutex
        self._tracker = self.window.tracker
        self.checkpointer = Checkpointer(
            self.window,
            token_store,
            ack_store,
            key=spec.resume_token_key,
            namespace=spec.namespace,
            level=spec.level,
            stop_event=stop_event,
            on_store_error=self._store_failed,
        )
        self.oplog = OplogWindow(spec.client, spec.name)
        self.dispatcher: Dispatcher | None = None
        self._coalescing: CoalescingLanes | None = None
        self.watcher: Watcher | None = None
        #: Runnable items the watcher has not handed to the workers yet (watcher thread only).
        self._runnable: list[WorkItem | FanOut] = []
        #: Set once the first stream opened or the start failed (``connect_error`` says why).
        self.connected = threading.Event()
        self.connect_error: BaseException | None = None
        self._initial_save = False
        #: Where a start without a resumable checkpoint asked to begin (start_from_past, rewind).
        self._start_time: Timestamp | None = None
        #: Where the snapshot to run before the stream stands (None: no snapshot this start).
        self._snapshot_progress: SnapshotProgress | None = None
        self.snapshot_runner: SnapshotRunner | None = None
        self._snapshot_lock = threading.Lock()
        self._split = False  # append $changeStreamSplitLargeEvent (after a 10334)
        self._narrow = False  # the server cannot split: read one event per batch to find the big one
        self._stub_next = False  # ... then fetch that event alone, without its documents
        self.oversize_events = 0
        #: Updates that full_document_only subscriptions skipped: their document was gone.
        self.missing_documents = 0
        self.history_gaps = 0
        #: Streams reopened since start (errors, invalidations, lost history).
        self.reconnections = 0
        self.stream_active = False
        self.last_event: tuple[float, Any, Any] | None = None  # (received at, wall time, cluster time)
        self._newest: ChangeEvent | None = None  # the newest event, until on_drained notes it
        #: The last stream or store error and when it happened.
        self.last_error: tuple[str, datetime] | None = None

    # -- wiring and lifecycle -------------------------------------------------------------

    def attach(self, dispatcher: Dispatcher, wake_flusher: Callable[[], None]) -> None:
        """Use ``dispatcher`` (built on :attr:`window`'s lock and ``finish``) and the flusher."""
        self.dispatcher = dispatcher
        self.window.connect(dispatcher.drain, wake_flusher)
        if self.spec.coalesce:
            self._coalescing = dispatcher.coalesce(self._on_coalesced if self.metrics is not None else None)

    @property
    def coalesced(self) -> int:
        """Events replaced by a newer event of their document before delivery (``coalesce=True``)."""
        lanes = self._coalescing
        return lanes.coalesced if lanes is not None else 0

    def _on_coalesced(self, replaced: WorkItem) -> None:
        if self.metrics is not None:  # called with the window lock held: one counter add
            event = replaced.event
            self.metrics.event_coalesced(replaced.sub.name, str(event.operation_type), event.namespace)

    def start(self, position: Position) -> None:
        """Start the watcher at ``position`` (see :meth:`initial_position`), or first the snapshot."""
        progress = self._snapshot_progress
        if progress is None:
            self._start_watcher(position)
            return
        spec = self.spec
        self.snapshot_runner = SnapshotRunner(
            name=self.name,
            target=spec.target,
            collections=snapshot_targets(spec.target, spec.snapshot_collections),
            progress=progress,
            query=spec.snapshot_filter,
            batch_size=spec.snapshot_batch_size,
            on_event=self.on_event,
            release=self._release_runnable,
            save_start=self._save_snapshot_start,
            start_stream=self._stream_after_snapshot,
            connected=self._on_connected,
            fail=self._fail,
            translate=self._translate,
            oplog=self.oplog,
            history_lost_raises=spec.on_history_lost == "raise",
            stop_event=self._stop,
            key=spec.resume_token_key,
        )
        self.snapshot_runner.start()

    def _save_snapshot_start(self, token: Mapping[str, Any]) -> None:
        if self.token_store is None:
            self.window.note_resume_token(token)
        else:
            self.checkpointer.save_opening(token)

    def _stream_after_snapshot(self, position: Position) -> None:
        with self._snapshot_lock:  # stop_watcher() reads the watcher under it
            if not self._stop.is_set():
                # The scan is over: once its last events are done the checkpoint is T0 itself,
                # not a marker that a restart would take for an unfinished scan.
                self.window.note_resume_token(position.resume_after)
                self._start_watcher(position)

    def _start_watcher(self, position: Position) -> None:
        self.watcher = Watcher(
            name=self.name,
            open_stream=self._open_stream,
            on_event=self.on_event,
            on_resume_token=self._on_resume_token,
            on_error=self._on_stream_error,
            on_connected=self._on_connected,
            on_opened=self._on_opened,
            on_reconnect=self._on_reconnect,
            on_active=self._on_active,
            on_drained=self._on_drained,
            on_fatal=self._fail,
            stop_event=self._stop,
        )
        self.watcher.start(position)

    def stop_watcher(self, deadline: float, hurry: threading.Event) -> None:
        """Wait for the watcher to end (the bus set the stop flag); ``hurry`` stops waiting.

        It ends within one getMore (``max_await_time``) unless it is stuck in the driver,
        for instance in server selection.
        """
        runner = self.snapshot_runner
        if runner is not None:
            runner.join(deadline - time.monotonic())
        with self._snapshot_lock:
            watcher = self.watcher
        if watcher is None:
            return
        watcher_deadline = max(deadline, time.monotonic() + self.spec.max_await_time + 1.0)
        while not watcher.join(min(0.1, watcher_deadline - time.monotonic())):
            if hurry.is_set() or time.monotonic() >= watcher_deadline:
                break

    def failed_to_start(self, error: BaseException) -> None:
        """The bus failed before the first stream opened: ``start()`` raises ``error``."""
        if not self.connected.is_set():
            self.connect_error = error
            self.connected.set()

    def initial_position(self) -> Position:
        """Where to start: after the stored checkpoint, else ``start_from_past``, else now."""
        if self.token_store is not None:
            checkpoint = self.token_store.load(self.spec.resume_token_key)
            progress = parse_progress(checkpoint.token) if checkpoint is not None else None
            if progress is not None and checkpoint is not None:  # a snapshot is unfinished or requested
                self._check_checkpoint(checkpoint)
                if progress.start is not None:
                    with self.window.cond:
                        self._tracker.checkpoint = checkpoint.token
                        self._tracker.checkpoint_time = checkpoint.cluster_time
                    self.checkpointer.loaded(checkpoint.cluster_time, progress.start)
                self._snapshot_progress = progress
                return Position()
            if (
                checkpoint is not None
                and self.spec.snapshot == "always"
                and rewind_time(checkpoint.token) is None
            ):
                self._check_checkpoint(checkpoint)
                self._snapshot_progress = SnapshotProgress(None)
                return Position()
            if checkpoint is None and self.spec.snapshot is not None:
                self._snapshot_progress = SnapshotProgress(None)
                return Position()
            rewound = rewind_time(checkpoint.token) if checkpoint is not None else None
            if rewound is not None and checkpoint is not None:  # a rewind marker: start at its time
                self._check_checkpoint(checkpoint)
                self._initial_save = True
                self._start_time = rewound
                self.checkpointer.loaded(rewound, None)
                log.info("bus %s was rewound; starting at cluster time %s", self.name, rewound)
                return Position(start_at_operation_time=rewound)
            if checkpoint is not None:
                self._check_checkpoint(checkpoint)
                with self.window.cond:
                    self._tracker.checkpoint = checkpoint.token
                    self._tracker.checkpoint_time = checkpoint.cluster_time
                self.checkpointer.loaded(checkpoint.cluster_time, checkpoint.token)
                log.info(
                    "bus %s resumes after its checkpoint (cluster time %s)",
                    self.name,
                    checkpoint.cluster_time,
                )
                return Position(resume_after=checkpoint.token)
            self._initial_save = True
        if self.token_store is None and self.spec.snapshot is not None:
            self._snapshot_progress = SnapshotProgress(None)
            return Position()
        past = self.spec.start_from_past
        if past == "all":
            self._start_time = oplog_oldest(self.spec.client)
            log.info(
                "bus %s has no checkpoint; starting at the oldest oplog entry %s", self.name, self._start_time
            )
            return Position(start_at_operation_time=self._start_time)
        if isinstance(past, timedelta):
            since = datetime.now(timezone.utc) - past
            log.info("bus %s has no checkpoint; starting from %s", self.name, since.isoformat())
            self._start_time = Timestamp(since, 0)
            return Position(start_at_operation_time=self._start_time)
        if self.spec.group_start is not None:
            self._start_time = self.spec.group_start
            log.info(
                "bus %s has no checkpoint; starting where its consumer group began (cluster time %s), "
                "so nothing written since is missed",
                self.name,
                self._start_time,
            )
            return Position(start_at_operation_time=self._start_time)
        return Position()

    def _check_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Refuse a stored checkpoint that is malformed or belongs to another namespace."""
        key, where = self.spec.resume_token_key, type(self.token_store).__name__
        problem = token_problem(checkpoint.token)
        if problem is not None:
            raise malformed(key, where, problem)
        if (checkpoint.namespace is not None and checkpoint.namespace != self._namespace) or (
            checkpoint.level is not None and checkpoint.level != self.spec.level
        ):
            raise StoreError(
                f"bus {self.name!r}: the stored checkpoint {key!r} in {where} was written by a bus watching "
                f"{checkpoint.namespace} ({checkpoint.level} watch), but this bus watches {self._namespace} "
                f"({self.spec.level} watch): resuming there would deliver another stream's changes or skip this one's. "
                "It was left untouched. Give this bus its own resume_token_id, or reset_resume_token() if the "
                "target was renamed on purpose"
            )

    def _store_failed(self, exc: BaseException, what: str) -> None:
        self.last_error = (f"{type(exc).__name__}: {exc}", datetime.now(timezone.utc))
        self._report(exc, "store", what=what)

    # -- queries ----------------------------------------------------------------------------

    def checkpoint_age(self) -> float | None:
        """Seconds from the cluster time of the stored checkpoint to now (``None`` before one)."""
        persisted = self.checkpointer.persisted_time
        if persisted is None:
            return None
        return max(0.0, time.time() - persisted)

    def oplog_headroom(self) -> float | None:
        """Seconds of oplog between its oldest entry and the stored checkpoint."""
        return self.oplog.headroom(self.checkpointer.persisted_time)

    @property
    def opened(self) -> bool:
        """The stream opened at least once (True before the watcher exists)."""
        return self.watcher is None or self.watcher.opened

    # -- the watcher's callbacks --------------------------------------------------------------

    def _open_stream(self, position: Position) -> ChangeStream[Any]:
        spec = self.spec
        kwargs: dict[str, Any] = position.kwargs()
        if spec.full_document is not None:
            kwargs["full_document"] = spec.full_document.value
        if spec.full_document_before_change is not None:
            kwargs["full_document_before_change"] = spec.full_document_before_change
        if spec.show_expanded_events:
            kwargs["show_expanded_events"] = True
        pipeline = self._own_filter() + spec.pipeline
        batch_size = spec.batch_size
        if self._stub_next:
            pipeline.append({"$project": dict.fromkeys(_LARGE_FIELDS, 0)})
        elif self._split:
            pipeline.append({"$changeStreamSplitLargeEvent": {}})
        if self._narrow:
            batch_size = 1
        return spec.target.watch(
            pipeline or None,
            batch_size=batch_size,
            max_await_time_ms=int(spec.max_await_time * 1000),
            **kwargs,
        )

    def _own_filter(self) -> list[dict[str, Any]]:
        """A database or cluster watch must not see the bus's own checkpoint writes."""
        store = self.token_store
        if self.spec.level == "collection" or not isinstance(store, MongoResumeTokenStore):
            return []
        coll = store.collection
        if self.spec.level == "database" and coll.database.name != self.spec.db_name:
            return []
        return [{"$match": {"$nor": [{"ns.db": coll.database.name, "ns.coll": coll.name}]}}]

    def _on_opened(self, stream: ChangeStream[Any]) -> bool:
        """Persist where a first-ever stream opened, before ``start()`` returns.

        Without this, a bus that fails before its first checkpoint write would
        restart "from now" and skip what happened in between.
        """
        if not self._initial_save or self.token_store is None:
            return True
        token = self._plain(stream.resume_token)  # the post-batch token of an empty first batch, else None
        if token is None:
            return True  # history arrived in the first batch (start_from_past): nothing to pin
        try:
            self.checkpointer.save_opening(token)
        except StoreError as exc:
            self._report(exc, "store", what="write the opening position")
            self._on_connected(exc)
            self._fail(exc)
            return False
        self._initial_save = False
        return True

    def _on_connected(self, error: BaseException | None) -> None:
        if error is not None:
            self.connect_error = self._translate(error)
        self.connected.set()

    def _translate(self, exc: BaseException) -> BaseException:
        if isinstance(exc, MongoEventsError):
            return exc
        kind = classify_error(exc)
        key = self.spec.resume_token_key
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
                err = StreamError(message, key=key)
        elif kind is ErrorKind.CONFIGURATION:
            err = ConfigurationError(f"bus {self.name!r} cannot watch {self._namespace}: {explain(exc)}")
        elif kind is ErrorKind.HISTORY_LOST:
            err = self._history_lost_error(exc)
        else:
            err = StreamError(f"bus {self.name!r}: change stream on {self._namespace} failed: {exc}", key=key)
        err.__cause__ = exc
        return err

    def _history_lost_error(self, exc: BaseException) -> ResumeTokenLost:
        since = self._tracker.checkpoint_time
        key = self.spec.resume_token_key
        if self._tracker.checkpoint is None and self._start_time is not None:
            start = self._start_time
            return ResumeTokenLost(
                f"bus {self.name!r}: the requested start {start} "
                f"({datetime.fromtimestamp(start.time, timezone.utc).isoformat()}, from start_from_past or a "
                f"rewind) is older than the oldest entry in the oplog: the changes before that are gone "
                f"(server said: {exc}). Start later: a smaller start_from_past, start_from_past='all' for "
                "everything still in the oplog, or rewind to a time the oplog still holds",
                key=key,
                since=start,
            )
        return ResumeTokenLost(
            f"bus {self.name!r}: the resume point {key} (checkpoint cluster time {since}) "
            f"can no longer be resumed: {exc}. Events after it may be gone from the oplog. Decide, then either "
            f"reset_resume_token() to start from now, or pass on_history_lost='restart_from_now'",
            key=key,
            since=since,
        )

    def _on_stream_error(self, kind: ErrorKind, exc: BaseException, position: Position) -> Position | None:
        if kind is ErrorKind.OVERSIZE and not (self._split or self._narrow or self._stub_next):
            log.warning(
                "bus %s: an event on %s exceeds 16 MB (%s); reopening with $changeStreamSplitLargeEvent to receive it in fragments",
                self.name,
                self._namespace,
                exc,
            )
            self._split = True
            return position
        if kind is ErrorKind.CONFIGURATION and self._split and getattr(exc, "code", None) == 40324:
            # The failed batch may also hold ordinary events before the big one: read one
            # event per batch until the big one fails again, so we know exactly which it is.
            log.warning(
                "bus %s: the server cannot split large events (needs MongoDB 6.0.9+ or 7.0); finding the oversize event",
                self.name,
            )
            self._split = False
            self._narrow = True
            return position
        if kind is ErrorKind.OVERSIZE and self._narrow:
            self._stub_next = True  # the very next event is the oversize one: fetch it without documents
            return position
        if (
            kind is ErrorKind.HISTORY_LOST
            and self.spec.on_history_lost == "restart_from_now"
            and position.kwargs()
        ):
            since = self._tracker.checkpoint_time
            key = self.spec.resume_token_key
            self.history_gaps += 1
            log.error(
                "bus %s: resume point %s lost (%s); restarting from now: changes since %s are skipped",
                self.name,
                key,
                exc,
                since,
            )
            if self.spec.history_lost_callback is not None:
                try:
                    self.spec.history_lost_callback(key, since)
                except Exception:
                    log.exception("history_lost_callback failed")
            return Position()
        error = self._translate(exc)
        self._report(error, "stream", what=f"{kind.value} error; the bus stops")
        if not self.connected.is_set():
            self._on_connected(error)
        self._fail(error)
        return None

    def on_event(self, raw: Mapping[str, Any]) -> bool:
        """Admit one raw change into the window and hand its work on; False stops the watcher."""
        # The hot path: one call per event on the watcher thread. Written to do little
        # beyond what the semantics need (attribute reads hoisted, helpers inlined), since
        # each call or allocation here is a visible share of the per-event cost.
        if self._gate is not None and not self._gate():
            return False  # this partition's lease is gone: admit and deliver nothing more
        raw_options = self._raw_options
        if raw_options is None:
            event = ChangeEvent.from_raw(raw, self._default_db, self._default_coll)
        elif isinstance(raw, RawBSONDocument):
            event = ChangeEvent.from_raw_bson(raw, self._default_db, self._default_coll, raw_options)
        else:  # a dict holding raw sub-documents: a reassembled split event, a snapshot read
            plain = {key: decoded(value, raw_options) for key, value in raw.items()}
            event = ChangeEvent.from_raw(plain, self._default_db, self._default_coll)
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
        if self._keep is not None and not self._keep(raw):
            subs = ()  # another partition's change
        elif op is _UPDATE and not self.include_empty_updates and (desc is None or desc.is_empty):
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
                    self.name,
                    op,
                    event.namespace,
                    event.document_key,
                    self.missing_documents,
                )
        token = None if op is _INVALIDATE else event.resume_token
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
        dispatcher = self.dispatcher
        assert dispatcher is not None
        tracker = self._tracker
        window = self.window
        with self._mutex:
            if dispatcher.finished:  # drain()'s own test, read here: most events find nothing done
                dispatcher.drain()
            if barrier and not self._wait_until_idle():
                return False
            if tracker.full and not self._wait_for_room():
                return False
            slot = tracker.begin(token, event.cluster_time, len(subs), event.id)  # window.admit(), inlined
            if not subs:
                tracker.advance()
                if window.joining:
                    window.cond.notify_all()
                return True
            acks = window.acks  # read under the lock: a flush swaps it
            if acks is not None:
                acks[event.id] = AckRecord(event.id, datetime.now(timezone.utc))
            delivered_desc = desc if self.update_description else None
            runnable = self._runnable  # read after any wait for room: that wait releases it
            if self._single:  # the common case, spelled out: its document alone names its lane
                sub = subs[0]
                lane = doc_lane if doc_lane is not None else (sub.index if ordering == "stream" else None)
                work = WorkItem(sub, event, slot, lane, delivered_desc)
                if (
                    lane is None or dispatcher.lanes.push(lane, work) is not None
                ):  # dispatcher.admit(), inlined
                    runnable.append(work)
            else:  # one item for all of them where their lanes allow (see Dispatcher.fan_out)
                lanes_key = (
                    doc_lane if doc_lane is not None else (STREAM_LANE if ordering == "stream" else None)
                )
                dispatcher.fan_out(subs, event, slot, lanes_key, delivered_desc, runnable)
            if barrier and not self._wait_until_idle():  # later events wait for it to finish
                return False
        if len(runnable) >= _RELEASE_AT:
            self._release_runnable()
        return True

    def _wait_for_room(self) -> bool:
        self._release_runnable()  # the window can only drain if the workers have its items
        return self.window.wait_for_room()

    def _wait_until_idle(self) -> bool:
        self._release_runnable()  # the workers need the items the watcher still holds
        return self.window.wait_until_idle()

    def _on_drained(self) -> None:
        """The watcher read all it holds: hand the collected items on; note the newest event."""
        self._release_runnable()
        event = self._newest
        if event is not None:
            self._newest = None
            self.last_event = (time.time(), event.wall_time, event.cluster_time)

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
            dispatcher = self.dispatcher
            assert dispatcher is not None
            dispatcher.enqueue_all(items)

    def _on_oversize_stub(self, event: ChangeEvent) -> bool:
        """The event the server could neither send nor split, without its documents: dead-letter it."""
        self._stub_next = self._narrow = False
        self.oversize_events += 1
        key = self.spec.resume_token_key
        error = StreamError(
            f"change event {event.id} ({event.operation_type} {event.namespace} {event.document_key}) exceeds 16 MB "
            "and the server cannot split it; only its key and token were kept",
            key=key,
        )
        if self._dead_letters is None:
            self._fail(
                StreamError(
                    f"bus {self.name!r}: {error}; configure dead_letters to record it and go on", key=key
                )
            )
            return False
        try:
            self._dead_letters(event, f"{self.name}:oversize", error, 1)
        except Exception as exc:  # (a failure is already reported to on_error by the wrapped hook)
            self._fail(
                StreamError(
                    f"bus {self.name!r}: could not dead-letter oversize event {event.id}: {exc}", key=key
                )
            )
            return False
        log.error("bus %s: %s; dead-lettered as a stub", self.name, error)
        if self.metrics is not None:
            self.metrics.dead_letter_stored(f"{self.name}:oversize")
        window = self.window
        with window.cond:
            window.admit(event.resume_token, event.cluster_time, 0, event.id)
            window.cond.notify_all()
        if self.watcher is not None:
            self.watcher.request_reopen()  # back to full events after it
        return True

    def _on_resume_token(self, token: Mapping[str, Any] | None) -> None:
        self.window.note_resume_token(self._plain(token))

    def _plain(self, token: Any) -> Any:
        """A token as the stores and the window keep it: a plain document, never raw BSON."""
        return token if self._raw_options is None else decoded(token, self._raw_options)

    def _on_active(self, active: bool) -> None:
        self.stream_active = active
        if self.metrics is not None:
            (self.metrics.stream_opened if active else self.metrics.stream_closed)(self._namespace)

    def _on_reconnect(self, reason: str, exc: BaseException | None) -> None:
        self.reconnections += 1
        if exc is not None:
            self.last_error = (f"{type(exc).__name__}: {exc}", datetime.now(timezone.utc))
            self._report(exc, "stream", what=f"reconnect ({reason})")
        if self.metrics is not None:
            self.metrics.reconnected(self._namespace, reason)
