"""The options of one :class:`~mongo_events.Bus`: checked once, at construction, into one object.

:meth:`BusOptions.build` refuses every bad option with a :class:`ConfigurationError`
naming it (the generic checks are in :mod:`mongo_events.options`), fills in the
defaults and what follows from the target (the watch level, the namespace, the
checkpoint key and store), and :meth:`BusOptions.spec` hands the stream consumer what
it reads. What each option means is documented once, on :class:`~mongo_events.Bus`.

Adding an option: its keyword (with a default) and ``:param:`` line in ``Bus.__init__``,
then, here, a field of :class:`BusOptions` (same name and order), its check in
:func:`_check` (or :meth:`BusOptions.build` when it depends on other options), and a
line in :meth:`BusOptions.spec` if the stream consumer reads it. A line in
:class:`BusOptionAttributes` makes it an attribute of the bus too (``bus.<option>``);
new options need none: ``bus.options.<option>`` reads every one.
tests/test_bus_options.py checks that the keywords, the fields and the docstring agree.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Generic, Literal, Protocol, TypeVar, overload

import attrs
from bson.timestamp import Timestamp
from pymongo import MongoClient
from pymongo.collection import Collection as MongoCollection
from pymongo.database import Database

from .consumer import StreamSpec
from .decoding import CattrsDecoder, Decoder
from .dispatch import DeadLetterHook, check_coalesce
from .errors import ConfigurationError
from .events import FullDocument
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
from .reporting import ErrorHandler, ErrorReporter
from .stores.base import AckStore, DeadLetterStore, ResumeTokenStore
from .stores.mongodb import DEFAULT_COLLECTION, MongoResumeTokenStore

__all__ = [
    "BusOptionAttributes",
    "BusOptions",
    "HistoryLostPolicy",
    "OptionAttribute",
    "Ordering",
    "as_idempotency",
    "check_payload",
]

T = TypeVar("T")
Ordering = Literal["document", "stream", "none"]
HistoryLostPolicy = Literal["raise", "restart_from_now"]
Target = MongoCollection[Any] | Database[Any] | MongoClient[Any]

_FULL_DOCUMENT_OPTIONS = {FullDocument.UPDATE_LOOKUP, FullDocument.WHEN_AVAILABLE, FullDocument.REQUIRED}


@attrs.frozen
class BusOptions:
    """The validated options of one bus (``Bus.options``); see :class:`~mongo_events.Bus`.

    The first fields are ``Bus``'s keywords, in order, with defaults filled in and values
    normalised (``full_document`` a :class:`FullDocument`, ``max_await_time`` seconds, the
    stores wrapped as the bus uses them); the rest follow from them. Build one with
    :meth:`build`, which checks everything; the constructor checks nothing.

    .. versionadded:: 0.2.0
    """

    target: Target
    name: str
    full_document: FullDocument | None
    full_document_before_change: str | None
    full_document_only: bool
    #: True also when ``max_updated_fields_size`` is set (it implies the description).
    update_description: bool
    include_empty_updates: bool
    max_updated_fields_size: int
    pipeline: list[dict[str, Any]]
    batch_size: int | None
    max_await_time: float
    show_expanded_events: bool
    resume: bool
    resume_token_store: ResumeTokenStore | None
    resume_token_collection: MongoCollection[Any] | str | None
    resume_token_id: str
    start_from_past: timedelta | Literal["all"] | None
    max_workers: int
    max_in_flight: int
    ordering: Ordering
    flush_interval: float
    decoder: Decoder
    middleware: Sequence[Middleware]
    dead_letters: DeadLetterStore | DeadLetterHook | None
    ack_store: AckStore | None
    on_history_lost: HistoryLostPolicy
    history_lost_callback: Callable[[str, Timestamp | None], None] | None
    start_timeout: float
    metrics: Metrics | None
    monitor: MonitorMiddleware | None
    on_error: ErrorHandler | None
    status: StatusPublisher | None
    idempotency: Idempotency | None
    crash_store: IdempotencyStore | None
    snapshot: Literal["initial", "always"] | None
    snapshot_collections: list[str] | None
    snapshot_filter: dict[str, Any] | None
    snapshot_batch_size: int
    coalesce: bool
    group: str | None
    partitions: int
    lease_ttl: float
    # -- what follows from the options above ---------------------------------------------
    #: ``"collection"``, ``"database"`` or ``"cluster"``: what ``target`` watches.
    level: str
    #: The watched database (``admin`` for a cluster watch).
    db: Database[Any]
    #: What is watched: ``db.coll``, ``db.*`` or ``*.*``.
    namespace: str
    #: The watched collection's name (collection watch only).
    default_coll: str | None
    #: Where the checkpoint lives (``None`` with ``resume=False``).
    token_store: ResumeTokenStore | None
    #: Counts each event's starts for subscriptions without idempotency (``crash_store``).
    crash_counter: CrashCounter | None
    #: Every delivery's hooks, outermost first: monitor, metrics, ``middleware``, the
    #: ``on_error`` reporter, the status publisher.
    chain: list[Middleware]

    @classmethod
    def build(cls, target: Any, given: Mapping[str, Any]) -> BusOptions:
        """Check ``Bus(target, **given)``'s options and fill in their defaults.

        :param given: every keyword of ``Bus.__init__`` with its value (extra keys ignored).
        :raises ConfigurationError: for the first bad option, naming it and what is accepted.
        """
        if isinstance(target, MongoCollection):
            level, db, namespace, default_coll = "collection", target.database, "", target.name
            namespace = f"{target.database.name}.{target.name}"
        elif isinstance(target, Database):
            level, db, namespace, default_coll = "database", target, f"{target.name}.*", None
        elif isinstance(target, MongoClient):
            level, db, namespace, default_coll = "cluster", target.admin, "*.*", None
        else:
            raise ConfigurationError(
                f"Bus needs a pymongo Collection, Database or MongoClient to watch, got {type(target).__name__}"
            )
        o = dict(given, target=target)
        _check(o)
        check_coalesce(o["coalesce"], o["ordering"])
        check_group_options(
            o["group"], o["partitions"], o["lease_ttl"], resume=o["resume"], snapshot=o["snapshot"]
        )
        fd = FullDocument(o["full_document"]) if o["full_document"] is not None else None
        has_full = fd in _FULL_DOCUMENT_OPTIONS
        if o["max_updated_fields_size"] and not has_full:
            raise ConfigurationError(
                "max_updated_fields_size drops updated fields, so callbacks need the full document instead: "
                "also pass full_document=FullDocument.UPDATE_LOOKUP (or WHEN_AVAILABLE / REQUIRED)"
            )
        if o["full_document_only"] and not has_full:
            raise ConfigurationError(
                "full_document_only needs the stream to carry full documents for updates: "
                "also pass full_document=FullDocument.UPDATE_LOOKUP (or WHEN_AVAILABLE / REQUIRED)"
            )
        token_store, token_collection = o["resume_token_store"], o["resume_token_collection"]
        if token_store is not None and token_collection is not None:
            raise ConfigurationError("pass resume_token_store or resume_token_collection, not both")
        if not o["resume"] and (token_store is not None or token_collection is not None):
            raise ConfigurationError(
                "resume=False stores no position: drop resume_token_store / resume_token_collection, or resume"
            )
        idempotency = as_idempotency(o["idempotency"])
        crash_store = o["crash_store"]
        if crash_store is not None and not isinstance(crash_store, IdempotencyStore):
            raise ConfigurationError(
                f"crash_store must be an IdempotencyStore, got {type(crash_store).__name__}"
            )

        if not o["resume"]:
            token_store = None
        elif token_store is None:
            coll = token_collection
            if not isinstance(coll, MongoCollection):
                coll = db[coll or DEFAULT_COLLECTION]
            token_store = MongoResumeTokenStore(coll)
        if o["group"] is not None and not isinstance(token_store, MongoResumeTokenStore):
            raise ConfigurationError(
                f"group={o['group']!r} needs checkpoints in MongoDB (the default resume-token store, or a "
                f"MongoResumeTokenStore), where writes can be fenced; got {type(token_store).__name__}"
            )
        name = o["name"] or namespace
        monitor = o["monitor"]
        if isinstance(monitor, MonitorStore):
            monitor = MonitorMiddleware(monitor)
        status = o["status"]
        if isinstance(status, ConsumerStatusStore):
            status = StatusPublisher(status)
        # The monitor runs outermost (it sees what every other hook sees), then metrics.
        chain = [m for m in (monitor, o["metrics"]) if m is not None] + list(o["middleware"])
        if o["on_error"] is not None:
            chain.append(ErrorReporter(o["on_error"], name))
        if status is not None:
            chain.append(status)  # it counts deliveries for the dashboard
        max_await = o["max_await_time"]
        o.update(
            name=name,
            full_document=fd,
            update_description=o["update_description"] or o["max_updated_fields_size"] > 0,
            pipeline=[dict(s) for s in o["pipeline"] or ()],
            max_await_time=max_await.total_seconds()
            if isinstance(max_await, timedelta)
            else float(max_await),
            resume_token_id=o["resume_token_id"] or _hostname(),
            decoder=o["decoder"] or CattrsDecoder(),
            monitor=monitor,
            status=status,
            idempotency=idempotency,
            snapshot_collections=list(o["snapshot_collections"])
            if o["snapshot_collections"] is not None
            else None,
            snapshot_filter=dict(o["snapshot_filter"]) if o["snapshot_filter"] is not None else None,
            lease_ttl=float(o["lease_ttl"]),
            level=level,
            db=db,
            namespace=namespace,
            default_coll=default_coll,
            token_store=token_store,
            crash_counter=CrashCounter(crash_store) if crash_store is not None else None,
            chain=chain,
        )
        return cls(**{f.name: o[f.name] for f in attrs.fields(cls)})

    @property
    def resume_token_key(self) -> str:
        """``"<db.coll | db.* | *.*>:<resume_token_id>"``, the seed's key format."""
        return f"{self.namespace}:{self.resume_token_id}"

    @property
    def default_db(self) -> str:
        """The database of events that name none (``""`` for a cluster watch)."""
        return self.db.name if self.level != "cluster" else ""

    @property
    def dead_letter_store(self) -> DeadLetterStore | None:
        """``dead_letters`` when it is a store (not a function)."""
        return self.dead_letters if isinstance(self.dead_letters, DeadLetterStore) else None

    def spec(self) -> StreamSpec:
        """What the stream consumer reads and how it delivers."""
        return StreamSpec(
            name=self.name,
            target=self.target,
            level=self.level,
            namespace=self.namespace,
            default_db=self.default_db,
            default_coll=self.default_coll,
            db_name=self.db.name,
            client=self.db.client,
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
            snapshot=self.snapshot,
            snapshot_collections=self.snapshot_collections,
            snapshot_filter=self.snapshot_filter,
            snapshot_batch_size=self.snapshot_batch_size,
            coalesce=self.coalesce,
        )


class _HasOptions(Protocol):
    options: BusOptions


class OptionAttribute(Generic[T]):
    """A ``Bus`` attribute that reads one field of ``bus.options`` (``bus.batch_size``).

    Setting it replaces ``bus.options`` with a copy holding the new value, unchecked, as
    setting the plain attribute did: the next ``start()`` uses it.
    """

    def __init__(self, field: str | None = None) -> None:
        self.field = field or ""

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.field = self.field or name
        self.__doc__ = (
            f"``options.{self.field}`` (see the Bus docstring); setting it counts from the next start."
        )

    @overload
    def __get__(self, bus: None, owner: type[Any] | None = None) -> OptionAttribute[T]: ...

    @overload
    def __get__(self, bus: _HasOptions, owner: type[Any] | None = None) -> T: ...

    def __get__(self, bus: _HasOptions | None, owner: type[Any] | None = None) -> T | OptionAttribute[T]:
        if bus is None:
            return self
        return getattr(bus.options, self.field)  # type: ignore[no-any-return]

    def __set__(self, bus: _HasOptions, value: T) -> None:
        changes: dict[str, Any] = {self.field: value}
        bus.options = attrs.evolve(bus.options, **changes)


class BusOptionAttributes:
    """Each option as an attribute of the bus (``bus.max_workers``): :class:`~mongo_events.Bus`
    inherits these. They read ``bus.options``; setting one (unchecked, as setting the plain
    attribute always was) counts from the next start. ``snapshot`` reads as ``snapshot_mode``
    (``Bus.snapshot`` is a method); ``token_store`` and ``level`` follow from the options.
    """

    options: BusOptions

    name: OptionAttribute[str] = OptionAttribute()
    level: OptionAttribute[str] = OptionAttribute()
    full_document: OptionAttribute[FullDocument | None] = OptionAttribute()
    full_document_before_change: OptionAttribute[str | None] = OptionAttribute()
    full_document_only: OptionAttribute[bool] = OptionAttribute()
    update_description: OptionAttribute[bool] = OptionAttribute()
    include_empty_updates: OptionAttribute[bool] = OptionAttribute()
    max_updated_fields_size: OptionAttribute[int] = OptionAttribute()
    pipeline: OptionAttribute[list[dict[str, Any]]] = OptionAttribute()
    batch_size: OptionAttribute[int | None] = OptionAttribute()
    max_await_time: OptionAttribute[float] = OptionAttribute()
    show_expanded_events: OptionAttribute[bool] = OptionAttribute()
    resume: OptionAttribute[bool] = OptionAttribute()
    token_store: OptionAttribute[ResumeTokenStore | None] = OptionAttribute()
    start_from_past: OptionAttribute[timedelta | Literal["all"] | None] = OptionAttribute()
    max_workers: OptionAttribute[int] = OptionAttribute()
    max_in_flight: OptionAttribute[int] = OptionAttribute()
    ordering: OptionAttribute[Ordering] = OptionAttribute()
    flush_interval: OptionAttribute[float] = OptionAttribute()
    ack_store: OptionAttribute[AckStore | None] = OptionAttribute()
    on_history_lost: OptionAttribute[HistoryLostPolicy] = OptionAttribute()
    history_lost_callback: OptionAttribute[Callable[[str, Timestamp | None], None] | None] = OptionAttribute()
    start_timeout: OptionAttribute[float] = OptionAttribute()
    metrics: OptionAttribute[Metrics | None] = OptionAttribute()
    monitor: OptionAttribute[MonitorMiddleware | None] = OptionAttribute()
    on_error: OptionAttribute[ErrorHandler | None] = OptionAttribute()
    status: OptionAttribute[StatusPublisher | None] = OptionAttribute()
    idempotency: OptionAttribute[Idempotency | None] = OptionAttribute()
    snapshot_mode: OptionAttribute[Literal["initial", "always"] | None] = OptionAttribute("snapshot")
    snapshot_collections: OptionAttribute[list[str] | None] = OptionAttribute()
    snapshot_filter: OptionAttribute[dict[str, Any] | None] = OptionAttribute()
    snapshot_batch_size: OptionAttribute[int] = OptionAttribute()
    coalesce: OptionAttribute[bool] = OptionAttribute()
    group: OptionAttribute[str | None] = OptionAttribute()
    partitions: OptionAttribute[int] = OptionAttribute()
    lease_ttl: OptionAttribute[float] = OptionAttribute()

    @property
    def dead_letter_store(self) -> DeadLetterStore | None:
        """``dead_letters`` when it is a :class:`DeadLetterStore` (not a function)."""
        return self.options.dead_letter_store


def as_idempotency(value: IdempotencyStore | Idempotency | None) -> Idempotency | None:
    """``idempotency=`` as the guard the subscriptions use (a store gets the default guard)."""
    if value is None or isinstance(value, Idempotency):
        return value
    if isinstance(value, IdempotencyStore):
        return Idempotency(value)
    raise ConfigurationError(
        f"idempotency must be an IdempotencyStore or an Idempotency, got {type(value).__name__}"
    )


def check_payload(decoder: Decoder, payload: Any) -> None:
    """Ask the converter for ``subscribe(payload=...)``'s structure hook now, not at the first event."""
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


def _hostname() -> str:
    try:
        return socket.gethostname() or "default"
    except OSError:
        return "default"


def _check(o: Mapping[str, Any]) -> None:
    """Refuse every bad single option with a :class:`ConfigurationError` naming it."""
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
