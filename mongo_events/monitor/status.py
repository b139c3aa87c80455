"""Consumer status: each running bus publishes a document every few seconds, so that a
dashboard or ``mongo-events monitor serve`` in another process can tell its health.

The document holds the same numbers as :meth:`mongo_events.Bus.health` plus what this
process delivered (counted by :class:`StatusPublisher`, a middleware) and a heartbeat.
A TTL on the heartbeat makes the documents of dead processes fade out.
"""

from __future__ import annotations

import abc
import builtins
import collections
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import attrs
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import PyMongoError

from ..delivery import Delivery
from ..errors import ConfigurationError, StoreError
from ..middleware.base import Middleware
from .records import rfc3339

if TYPE_CHECKING:
    from ..bus import Bus

__all__ = [
    "ConsumerStatus",
    "ConsumerStatusStore",
    "GroupView",
    "group_views",
    "MemoryConsumerStatusStore",
    "MongoConsumerStatusStore",
    "StatusPublisher",
    "DEFAULT_STATUS_COLLECTION",
]

log = logging.getLogger(__name__)

#: Where :class:`MongoConsumerStatusStore` writes by default.
DEFAULT_STATUS_COLLECTION = "_event_consumers"

#: Width of one bucket of the delivery counts, and how many buckets are kept (30 minutes).
_BUCKET = 60
_BUCKETS = 30

#: Seconds between looks at a starting bus's state (the publisher writes again once it runs).
_START_POLL = 0.05


@attrs.frozen
class ConsumerStatus:
    """One consumer's published status (one per bus per process).

    :ivar id: ``"<host>:<pid>:<bus>"``.
    :ivar bus: the bus's name.
    :ivar group: its consumer group (``None`` without one).
    :ivar partitions: the partitions it holds (empty without a group).
    :ivar partition_count: the group's partition count ``K`` (``None`` without a group, or
        from a publisher older than this field).
    :ivar host: the host name; :ivar pid: the process id.
    :ivar status: ``healthy``, ``degraded`` or ``unhealthy``, as :meth:`Bus.health`.
    :ivar state: the :class:`mongo_events.BusState` value.
    :ivar namespace: what is watched; :ivar checkpoint_key: its resume-token key.
    :ivar checkpoint_time: the cluster time of the stored checkpoint.
    :ivar lag: seconds from the last event's cluster time to its receipt.
    :ivar checkpoint_age: seconds since the stored checkpoint's cluster time.
    :ivar oplog_headroom: seconds of oplog before the checkpoint falls off (``None`` if unknown).
    :ivar pending: events received and not finished; :ivar in_flight: held after the checkpoint.
    :ivar reconnections: streams reopened since start.
    :ivar processed: deliveries that succeeded since start; :ivar failed: attempts that raised.
    :ivar dead_lettered: events handed to the dead-letter store since start.
    :ivar history: ``[[minute start (epoch seconds), processed, failed], ...]``, the last 30 minutes.
    :ivar last_error: the last error, at :ivar last_error_at:.
    :ivar started_at: when the bus started; :ivar heartbeat_at: when this was written.
    :ivar interval: seconds between writes (a reader calls the status stale after 3 of them).

    .. versionchanged:: 0.2.0
       ``partition_count``, and :meth:`is_live`.
    """

    id: str
    bus: str
    host: str
    pid: int
    status: str
    state: str
    namespace: str
    checkpoint_key: str
    heartbeat_at: datetime
    interval: float
    group: str | None = None
    partitions: Sequence[int] = ()
    partition_count: int | None = None
    checkpoint_time: datetime | None = None
    lag: float | None = None
    checkpoint_age: float | None = None
    oplog_headroom: float | None = None
    pending: int | None = None
    in_flight: int = 0
    reconnections: int = 0
    processed: int = 0
    failed: int = 0
    dead_lettered: int = 0
    history: Sequence[Sequence[int]] = ()
    last_error: str | None = None
    last_error_at: datetime | None = None
    started_at: datetime | None = None

    def is_stale(self, now: datetime | None = None) -> bool:
        """True when no heartbeat came for three intervals (the process is gone or stuck)."""
        now = now or datetime.now(timezone.utc)
        return (now - self.heartbeat_at).total_seconds() > 3 * self.interval + 1

    def is_live(self, now: datetime | None = None) -> bool:
        """True when it consumes now: a fresh heartbeat, and neither stopped nor failed.

        Only a live consumer counts towards a bus's health and holds partitions in
        :func:`group_views`: the last status of a killed process keeps naming the
        partitions it held until the TTL removes it, long after another member took them.
        """
        return not self.is_stale(now) and self.state not in ("stopped", "failed")

    def effective_status(self, now: datetime | None = None) -> str:
        """``status``, except ``unhealthy`` for a stale heartbeat."""
        return "unhealthy" if self.is_stale(now) else self.status

    def per_minute(self) -> tuple[int, int]:
        """Processed and failed in the 60 s before the heartbeat (the current minute's counts
        plus the previous minute's, prorated)."""
        now = self.heartbeat_at.timestamp()
        minute = int(now // _BUCKET) * _BUCKET
        share = 1.0 - (now - minute) / _BUCKET
        processed = failed = 0.0
        for start, p, f in self.history:
            weight = 1.0 if start == minute else share if start == minute - _BUCKET else 0.0
            processed += p * weight
            failed += f * weight
        return round(processed), round(failed)

    def to_document(self) -> dict[str, Any]:
        """The stored shape (``_id`` for ``id``; times as BSON dates)."""
        doc = attrs.asdict(self)
        doc["_id"] = doc.pop("id")
        doc["partitions"] = list(self.partitions)
        doc["history"] = [list(h) for h in self.history]
        return doc

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> ConsumerStatus:
        values = {f.name: doc[f.name] for f in attrs.fields(cls) if f.name in doc}
        values["id"] = str(doc["_id"])
        for name in ("heartbeat_at", "checkpoint_time", "last_error_at", "started_at"):
            value = values.get(name)
            if isinstance(value, datetime) and value.tzinfo is None:
                values[name] = value.replace(tzinfo=timezone.utc)  # pymongo returns naive UTC
        values["partitions"] = tuple(values.get("partitions") or ())
        values["history"] = tuple(tuple(int(x) for x in h) for h in values.get("history") or ())
        return cls(**values)

    def to_json(self, now: datetime | None = None) -> dict[str, Any]:
        """JSON-ready (RFC 3339 times), with ``stale`` and ``processed_per_minute``/``failed_per_minute``."""
        out = attrs.asdict(self)
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = rfc3339(value)
            elif isinstance(value, float):
                out[key] = round(value, 3)
        out["partitions"] = list(self.partitions)
        out["history"] = [list(h) for h in self.history]
        out["stale"] = self.is_stale(now)
        out["status"] = self.effective_status(now)
        out["processed_per_minute"], out["failed_per_minute"] = self.per_minute()
        return out


@attrs.frozen
class GroupView:
    """Who holds what in one consumer group on one namespace, from the published statuses.

    :ivar group: the group's name; :ivar namespace: what it watches.
    :ivar partition_count: ``K``, the largest a live member reported, or, when no live
        member reports one, the largest any member reported (``None`` when no member's
        status says, e.g. statuses from an older publisher). The statuses of members
        stopped before ``K`` was changed keep the old ``K`` until the TTL removes them.
    :ivar members: the live members (:meth:`ConsumerStatus.is_live`), by host and pid;
        each holds its ``partitions``.
    :ivar inactive: members that are stale, stopped or failed: they hold nothing, whatever
        their last status said.
    :ivar unheld: the partitions no live member holds (``None`` when ``K`` is unknown).
    :ivar contested: partitions two live members claim (two statuses written on either side
        of a handover; it lasts one heartbeat interval at most unless something is wrong).

    .. versionadded:: 0.2.0
    """

    group: str
    namespace: str
    partition_count: int | None
    members: tuple[ConsumerStatus, ...]
    inactive: tuple[ConsumerStatus, ...]
    unheld: tuple[int, ...] | None
    contested: tuple[int, ...]

    def to_json(self, now: datetime | None = None) -> dict[str, Any]:
        """The ``groups`` items of ``GET /v1/consumers``."""
        now = now or datetime.now(timezone.utc)
        return {
            "group": self.group,
            "namespace": self.namespace,
            "partition_count": self.partition_count,
            "members": [
                {"id": s.id, "bus": s.bus, "host": s.host, "pid": s.pid, "partitions": list(s.partitions)}
                for s in self.members
            ],
            "unheld": list(self.unheld) if self.unheld is not None else None,
            "contested": list(self.contested),
            "inactive": [
                {
                    "id": s.id,
                    "bus": s.bus,
                    "host": s.host,
                    "pid": s.pid,
                    "state": s.state,
                    "stale": s.is_stale(now),
                    "heartbeat_at": rfc3339(s.heartbeat_at),
                }
                for s in self.inactive
            ],
        }


def group_views(statuses: Sequence[ConsumerStatus], now: datetime | None = None) -> list[GroupView]:
    """One :class:`GroupView` per (group, namespace) among ``statuses``, sorted by both;
    statuses without a group are left out.

    .. versionadded:: 0.2.0
    """
    now = now or datetime.now(timezone.utc)
    by_group: dict[tuple[str, str], list[ConsumerStatus]] = {}
    for s in statuses:
        if s.group:
            by_group.setdefault((s.group, s.namespace), []).append(s)
    views = []
    for (group, namespace), found in sorted(by_group.items()):
        found.sort(key=lambda s: (s.host, s.pid, s.id))
        members = tuple(s for s in found if s.is_live(now))
        # The live members' K: after K was changed, the statuses of stopped old members keep
        # the old one until the TTL removes them, and would show phantom unheld partitions.
        counts = [s.partition_count for s in members if s.partition_count is not None]
        counts = counts or [s.partition_count for s in found if s.partition_count is not None]
        count = max(counts) if counts else None
        claims = collections.Counter(p for s in members for p in s.partitions)
        views.append(
            GroupView(
                group=group,
                namespace=namespace,
                partition_count=count,
                members=members,
                inactive=tuple(s for s in found if not s.is_live(now)),
                unheld=tuple(p for p in range(count) if p not in claims) if count is not None else None,
                contested=tuple(sorted(p for p, n in claims.items() if n > 1)),
            )
        )
    return views


class ConsumerStatusStore(abc.ABC):
    """Where consumers publish their :class:`ConsumerStatus`.

    :param ttl: seconds after its last heartbeat a status is forgotten.
    """

    def __init__(self, ttl: float = 120.0) -> None:
        if ttl <= 0:
            raise ConfigurationError("ttl must be > 0 seconds")
        self.ttl = ttl

    @abc.abstractmethod
    def publish(self, status: ConsumerStatus) -> None:
        """Write (replace) one consumer's status.

        :raises StoreError: when it cannot be written.
        """

    @abc.abstractmethod
    def list(self, bus: str | None = None) -> list[ConsumerStatus]:
        """The statuses heard from within ``ttl``, of one bus or all, by bus then host and pid.

        :raises StoreError: when they cannot be read.
        """

    def ensure_indexes(self) -> None:  # noqa: B027 - optional hook
        """Create what the store needs (the TTL index)."""

    def close(self) -> None:  # noqa: B027
        """Release resources."""

    def _fresh(self, statuses: Sequence[ConsumerStatus], bus: str | None) -> builtins.list[ConsumerStatus]:
        horizon = datetime.now(timezone.utc) - timedelta(seconds=self.ttl)
        kept = [s for s in statuses if s.heartbeat_at >= horizon and (bus is None or s.bus == bus)]
        return sorted(kept, key=lambda s: (s.bus, s.host, s.pid))


class MemoryConsumerStatusStore(ConsumerStatusStore):
    """In-process statuses, for tests and for one process serving its own dashboard."""

    def __init__(self, ttl: float = 120.0) -> None:
        super().__init__(ttl)
        self._lock = threading.Lock()
        self._statuses: dict[str, ConsumerStatus] = {}

    def publish(self, status: ConsumerStatus) -> None:
        with self._lock:
            self._statuses[status.id] = status

    def list(self, bus: str | None = None) -> list[ConsumerStatus]:
        with self._lock:
            statuses = list(self._statuses.values())
        return self._fresh(statuses, bus)


class MongoConsumerStatusStore(ConsumerStatusStore):
    """Statuses in a MongoDB collection (default ``_event_consumers``), with a TTL index on
    ``heartbeat_at``. The server sweeps expired documents about once a minute; reads skip
    them meanwhile.

    :param target: a ``Database`` (the collection is ``collection`` in it) or a ``Collection``.
    :param collection: the collection name in ``target``.
    :param ttl: seconds after its last heartbeat a status is removed.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        target: Database[Any] | Collection[Any],
        collection: str = DEFAULT_STATUS_COLLECTION,
        *,
        ttl: float = 120.0,
    ) -> None:
        super().__init__(ttl)
        self.collection: Collection[Any] = target if isinstance(target, Collection) else target[collection]

    def ensure_indexes(self) -> None:
        try:
            self.collection.create_index("heartbeat_at", expireAfterSeconds=int(max(1, self.ttl)))
        except PyMongoError as exc:
            raise StoreError(f"cannot create the TTL index on {self.collection.full_name}: {exc}") from exc

    def publish(self, status: ConsumerStatus) -> None:
        try:
            self.collection.replace_one({"_id": status.id}, status.to_document(), upsert=True)
        except PyMongoError as exc:
            raise StoreError(f"cannot write consumer status to {self.collection.full_name}: {exc}") from exc

    def list(self, bus: str | None = None) -> list[ConsumerStatus]:
        query: dict[str, Any] = {
            "heartbeat_at": {"$gte": datetime.now(timezone.utc) - timedelta(seconds=self.ttl)}
        }
        if bus is not None:
            query["bus"] = bus
        try:
            docs = list(self.collection.find(query).limit(1000))
        except PyMongoError as exc:
            raise StoreError(
                f"cannot read consumer statuses from {self.collection.full_name}: {exc}"
            ) from exc
        statuses = []
        for doc in docs:
            try:
                statuses.append(ConsumerStatus.from_document(doc))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning(
                    "skipping unreadable consumer status %r in %s: %s",
                    doc.get("_id"),
                    self.collection.full_name,
                    exc,
                )
        return self._fresh(statuses, bus)


class StatusPublisher(Middleware):
    """Publishes a bus's :class:`ConsumerStatus` every ``interval`` seconds on its own
    named daemon thread, and once more when the bus stops. As a middleware it counts the
    bus's deliveries (processed, failed attempts, dead letters) per minute.

    The first status is written at once, while the bus starts; the next as soon as it
    runs, then every ``interval``.

    Pass a store as ``Bus(status=store)`` (the bus builds this publisher), or build it
    for options. Publishing is best effort: a failed write is logged (once per outage)
    and tried again at the next tick; delivery is never affected.

    :param store: where statuses go.
    :param interval: seconds between writes.

    .. versionadded:: 0.1.0
    """

    def __init__(self, store: ConsumerStatusStore, interval: float = 5.0) -> None:
        if interval <= 0:
            raise ConfigurationError("interval must be > 0 seconds")
        self.store = store
        self.interval = interval
        self.host = socket.gethostname()
        self._lock = threading.Lock()
        self._buckets: collections.deque[list[int]] = collections.deque(maxlen=_BUCKETS)
        self._processed = self._failed = self._dead_lettered = 0
        self._bus: Bus | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at: datetime | None = None
        self._final = True
        self._indexed = False
        self._failing = False
        #: Writes that failed since start.
        self.failures = 0

    # -- counting (worker threads) ------------------------------------------------------

    def _bucket(self) -> list[int]:
        minute = int(time.time() // _BUCKET) * _BUCKET
        if not self._buckets or self._buckets[-1][0] != minute:
            self._buckets.append([minute, 0, 0])
        return self._buckets[-1]

    def after_delivery(self, delivery: Delivery, error: BaseException | None, duration: float) -> None:
        with self._lock:
            bucket = self._bucket()
            if error is None:
                self._processed += 1
                bucket[1] += 1
            else:
                self._failed += 1
                bucket[2] += 1

    def after_dead_letter(self, delivery: Delivery, error: BaseException) -> None:
        with self._lock:
            self._dead_lettered += 1

    # -- lifecycle (called by the bus) --------------------------------------------------

    def attach(self, bus: Bus) -> None:
        """Start publishing ``bus``'s status (``Bus.start`` calls this).

        :raises ConfigurationError: it publishes another bus's status now: one publisher
            serves one bus (give each bus its own, or pass the store as ``status=``).
        """
        other = self._bus
        if other is not None and other is not bus and self._thread is not None:
            raise ConfigurationError(
                f"this StatusPublisher already publishes bus {other.name!r}'s status; bus {bus.name!r} needs "
                "its own (pass the ConsumerStatusStore as status= and each bus makes one)"
            )
        self._end(0.0, final=False)
        self._bus = bus
        self._started_at = datetime.now(timezone.utc)
        with self._lock:
            self._processed = self._failed = self._dead_lettered = 0
            self._buckets.clear()
        self._stop = threading.Event()
        self._final = True
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name=f"mongo_events.status[{bus.name}]", daemon=True
        )
        self._thread.start()

    def detach(self, timeout: float, final: bool = True) -> None:
        """Stop publishing; the thread writes one final status first (the bus's stop calls this).

        Waits at most ``timeout`` seconds for that write. Only the bus it publishes can
        detach it: a call while that bus still runs (from a bus that :meth:`attach`
        refused, cleaning up its failed start) changes nothing.
        """
        bus = self._bus
        if bus is not None and bus.state.value not in ("stopped", "failed"):
            return
        self._end(timeout, final)

    def _end(self, timeout: float, final: bool) -> None:
        thread = self._thread
        if thread is None:
            return
        self._final = final
        self._stop.set()
        thread.join(max(0.0, timeout))
        if thread.is_alive():
            log.warning(
                "the final status of bus %s was not written within %.1fs",
                self._bus.name if self._bus else "?",
                timeout,
            )
        self._thread = None

    def _run(self, stop: threading.Event) -> None:
        try:
            while True:
                # Read before the snapshot: a bus that starts running between the two
                # would otherwise stand as "starting" for a whole interval.
                starting = self._bus is not None and self._bus.state.value == "starting"
                self.publish()
                if self._wait(stop, starting):
                    break
            if self._final:
                self.publish()
        except BaseException as exc:  # publish() keeps Exceptions; anything else ends it loudly
            self.failures += 1
            log.error(
                "bus %s: the status publisher thread died from %r; dashboards will call the bus stale "
                "(it keeps delivering)",
                self._bus.name if self._bus else "?",
                exc,
                exc_info=True,
            )

    def _wait(self, stop: threading.Event, starting: bool) -> bool:
        """Wait one interval; True when told to stop.

        When the status just written may say ``starting`` (``starting``: the bus was starting
        before its snapshot), look every :data:`_START_POLL` seconds whether it runs, and end
        the wait as soon as it does: that status says ``unhealthy``, and should not stand for a
        whole interval.
        """
        deadline = time.monotonic() + self.interval
        bus = self._bus
        if bus is None or not starting:
            return stop.wait(self.interval)
        while bus.state.value == "starting":
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if stop.wait(min(_START_POLL, left)):
                return True
        return stop.is_set()

    def snapshot(self) -> ConsumerStatus:
        """The status of the attached bus now."""
        bus = self._bus
        if bus is None:
            raise ConfigurationError("the status publisher is not attached to a bus")
        health = bus.health()
        now = datetime.now(timezone.utc)
        checkpoint_time = None
        if health.checkpoint_age is not None:  # the stored checkpoint's cluster time (whole seconds)
            checkpoint_time = datetime.fromtimestamp(
                round(now.timestamp() - health.checkpoint_age), timezone.utc
            )
        with self._lock:
            minute = int(time.time() // _BUCKET) * _BUCKET
            history = tuple((b[0], b[1], b[2]) for b in self._buckets if b[0] > minute - _BUCKET * _BUCKETS)
            processed, failed, dead = self._processed, self._failed, self._dead_lettered
        pid = os.getpid()
        return ConsumerStatus(
            id=f"{self.host}:{pid}:{bus.name}",
            bus=bus.name,
            host=self.host,
            pid=pid,
            status=health.status,
            state=health.state,
            namespace=health.namespace,
            checkpoint_key=bus.checkpoint_key_summary,  # a group: its partitions' keys
            heartbeat_at=now,
            interval=self.interval,
            checkpoint_time=checkpoint_time,
            lag=health.lag,
            checkpoint_age=health.checkpoint_age,
            oplog_headroom=health.oplog_headroom,
            pending=health.pending,
            in_flight=health.in_flight,
            reconnections=health.reconnections,
            processed=processed,
            failed=failed,
            dead_lettered=dead,
            history=history,
            last_error=health.last_error,
            last_error_at=health.last_error_at,
            started_at=self._started_at,
            group=health.group.name if health.group is not None else None,
            partitions=tuple(sorted(health.group.held)) if health.group is not None else (),
            partition_count=health.group.partitions if health.group is not None else None,
        )

    def publish(self) -> bool:
        """Write the status now, on the caller's thread; False (logged) when it failed."""
        try:
            if not self._indexed:
                self.store.ensure_indexes()
                self._indexed = True
            self.store.publish(self.snapshot())
        except Exception as exc:  # best effort: a dashboard must never stop a bus
            self.failures += 1
            if not self._failing:
                log.warning(
                    "bus %s: cannot publish its status (%s); dashboards will call it stale until this works again",
                    self._bus.name if self._bus else "?",
                    exc,
                )
            self._failing = True
            return False
        if self._failing:
            log.info("bus %s: publishing its status again", self._bus.name if self._bus else "?")
        self._failing = False
        return True
