"""What ``Bus.health()`` reports: one snapshot of a bus's state for probes and dashboards.

Also the oplog window (how far back the oplog reaches, read now and then), the rule
that turns a stream's state into ``healthy``, ``degraded`` or ``unhealthy``
(:func:`assess`), what a stream consumer shows it (:func:`stream_health`), and the watch
on failing dead-letter writes that hold the window shut (:class:`DeadLetterWatch`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, Literal, Protocol

import attrs
from bson.timestamp import Timestamp
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from .guard import describe
from .monitor.records import rfc3339

__all__ = ["DeadLetterWatch", "Health", "OplogWindow", "StreamView", "assess", "stream_health", "token_time"]

log = logging.getLogger(__name__)
#: health()'s own line (it moved here from bus.py) keeps the bus's logger.
_bus_log = logging.getLogger("mongo_events.bus")

HealthStatus = Literal["healthy", "degraded", "unhealthy"]


def token_time(token: Any) -> int | None:
    """Cluster time (seconds) encoded at the start of a resume token's ``_data``, if readable.

    Resume tokens are KeyStrings whose first value is the event's cluster timestamp
    (type byte ``0x82``, then 4 bytes of seconds and 4 of increment).
    """
    data = token.get("_data") if isinstance(token, Mapping) else None
    if not isinstance(data, str) or len(data) < 18 or not data.startswith("82"):
        return None
    try:
        return int(data[2:10], 16)
    except ValueError:
        return None


@attrs.frozen
class Health:
    """A bus's health.

    ``status`` is ``unhealthy`` when the bus is not running (or failed), ``degraded``
    while its stream is down or an error happened in the last minute, else ``healthy``.

    :ivar status: ``healthy``, ``degraded`` or ``unhealthy``.
    :ivar state: the :class:`mongo_events.BusState` value.
    :ivar stream_active: a change stream is open now.
    :ivar namespace: what is watched.
    :ivar last_event_at: when the last event was received (UTC).
    :ivar lag: seconds from the last event's cluster time to its receipt.
    :ivar checkpoint_age: seconds since the cluster time of the stored checkpoint.
    :ivar oplog_headroom: seconds of oplog before the checkpoint falls off, when readable.
    :ivar pending: events this process received and has not finished yet.
    :ivar in_flight: events held after the stored checkpoint.
    :ivar reconnections: streams reopened since start.
    :ivar last_error: the last stream or store error, with :ivar last_error_at:.
    :ivar phase: ``snapshot`` while the initial snapshot runs, else ``streaming``.
    :ivar snapshot_read: documents the snapshot read in this run (``None`` without one).
    :ivar snapshot_total: the estimated documents it had to read (``estimated_document_count``).
    :ivar group: with ``Bus(group=...)``, the member's view
        (:class:`~mongo_events.groups.runtime.GroupStatus`: partitions held, members seen,
        lease state); else ``None``.
    """

    status: HealthStatus
    state: str
    stream_active: bool
    namespace: str
    last_event_at: datetime | None
    lag: float | None
    checkpoint_age: float | None
    oplog_headroom: float | None
    pending: int | None
    in_flight: int
    reconnections: int
    last_error: str | None
    last_error_at: datetime | None
    phase: str = "streaming"
    snapshot_read: int | None = None
    snapshot_total: int | None = None
    group: Any = None

    @property
    def healthy(self) -> bool:
        """True unless ``status`` is ``unhealthy`` (a degraded bus still serves)."""
        return self.status != "unhealthy"

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = rfc3339(value)
            elif isinstance(value, float):
                out[key] = round(value, 3)
        return out


class OplogWindow:
    """The oldest oplog entry's time, read at most every ``max_age`` seconds.

    :param client: the client of the watched deployment.
    :param name: the bus's name, for the log line when ``local.oplog.rs`` cannot be read.
    """

    def __init__(self, client: MongoClient[Any], name: str) -> None:
        self._client = client
        self._name = name
        #: Cluster time (s) of the oldest oplog entry, when readable.
        self.oldest: int | None = None
        #: The same, in full (seconds and increment): what a snapshot's ``T0`` is compared with.
        self.oldest_ts: Timestamp | None = None
        self._checked = 0.0

    def refresh(self, max_age: float = 30.0) -> None:
        """Read the oldest oplog entry's time, unless read less than ``max_age`` seconds ago."""
        now = time.monotonic()
        if now - self._checked < max_age:
            return
        self._checked = now
        try:
            oldest = self._client["local"]["oplog.rs"].find_one(
                {}, sort=[("$natural", 1)], projection={"ts": 1}
            )
        except PyMongoError as exc:
            log.info(
                "bus %s: cannot read local.oplog.rs (%s); oplog headroom is not reported (next try in 10 min)",
                self._name,
                exc,
            )
            self.oldest = self.oldest_ts = None
            self._checked = now + 600.0  # not allowed now is unlikely to change soon
            return
        ts = oldest.get("ts") if oldest else None
        self.oldest_ts = ts if isinstance(ts, Timestamp) else None
        self.oldest = ts.time if isinstance(ts, Timestamp) else None

    def headroom(self, persisted_time: int | None) -> float | None:
        """Seconds of oplog between its oldest entry and a stored checkpoint's time."""
        if self.oldest is None or persisted_time is None:
            return None
        return float(persisted_time - self.oldest)


def assess(
    *,
    state: str,
    running: bool,
    opened: bool,
    stream_active: bool,
    namespace: str,
    last_event: tuple[float, Any, Any] | None,
    last_error: tuple[str, datetime] | None,
    failure: BaseException | None,
    checkpoint_age: float | None,
    oplog_headroom: float | None,
    pending: int | None,
    in_flight: int,
    reconnections: int,
    stalled: str | None = None,
) -> Health:
    """Turn a stream's state into a :class:`Health`.

    :param running: the bus is ``RUNNING``; ``opened``: its stream opened at least once.
    :param last_event: (received at, wall time, cluster time) of the newest event.
    :param last_error: the last stream or store error and when; ``failure``: why the bus failed.
    :param stalled: why delivery is held back although the bus runs (``unhealthy``).
    """
    last_event_at = lag = None
    if last_event is not None:
        received, wall, cluster_time = last_event
        last_event_at = datetime.fromtimestamp(received, timezone.utc)
        if wall is not None:
            wall = wall if wall.tzinfo else wall.replace(tzinfo=timezone.utc)
            lag = max(0.0, received - wall.timestamp())
        elif isinstance(cluster_time, Timestamp):
            lag = max(0.0, received - cluster_time.time)
    error = last_error
    if failure is not None:
        error = (f"{type(failure).__name__}: {failure}", error[1] if error else datetime.now(timezone.utc))
    if not running or not opened:
        # Not running, or running but its stream never opened: nothing is delivered at all.
        status: HealthStatus = "unhealthy"
        if error is None and running:
            error = (f"the change stream on {namespace} has not opened yet", datetime.now(timezone.utc))
    elif stalled is not None:
        status = "unhealthy"
        error = (stalled, datetime.now(timezone.utc))
    elif not stream_active or (
        error is not None and (datetime.now(timezone.utc) - error[1]).total_seconds() < 60
    ):
        status = "degraded"
    else:
        status = "healthy"
    return Health(
        status=status,
        state=state,
        stream_active=stream_active,
        namespace=namespace,
        last_event_at=last_event_at,
        lag=lag,
        checkpoint_age=checkpoint_age,
        oplog_headroom=oplog_headroom,
        pending=pending,
        in_flight=in_flight,
        reconnections=reconnections,
        last_error=error[0] if error else None,
        last_error_at=error[1] if error else None,
    )


class _Counts(Protocol):
    def pending(self) -> int: ...

    def size(self) -> int: ...


class _SnapshotProgress(Protocol):
    @property
    def phase(self) -> str: ...

    @property
    def read(self) -> int: ...

    @property
    def total(self) -> int | None: ...


class StreamView(Protocol):
    """What :func:`stream_health` reads from a stream consumer (health does not import it)."""

    @property
    def opened(self) -> bool: ...

    @property
    def stream_active(self) -> bool: ...

    @property
    def last_event(self) -> tuple[float, Any, Any] | None: ...

    @property
    def last_error(self) -> tuple[str, datetime] | None: ...

    @property
    def reconnections(self) -> int: ...

    @property
    def window(self) -> _Counts: ...

    @property
    def oplog(self) -> OplogWindow: ...

    @property
    def snapshot_runner(self) -> _SnapshotProgress | None: ...

    def checkpoint_age(self) -> float | None: ...

    def oplog_headroom(self) -> float | None: ...


def stream_health(
    stream: StreamView,
    *,
    name: str,
    state: str,
    running: bool,
    namespace: str,
    failure: BaseException | None,
    stalled: str | None,
    refresh_oplog: bool,
) -> Health:
    """The :class:`Health` of a bus reading ``stream`` (see :func:`assess`).

    :param refresh_oplog: read the oplog window first, if not read lately (without
        metrics, whose flusher task does it otherwise).
    """
    if refresh_oplog:
        try:
            stream.oplog.refresh()
        except Exception:  # a health probe must answer
            _bus_log.exception("bus %s: oplog window check failed", name)
    health = assess(
        state=state,
        running=running,
        opened=stream.opened,
        stream_active=stream.stream_active,
        namespace=namespace,
        last_event=stream.last_event,
        last_error=stream.last_error,
        failure=failure,
        checkpoint_age=stream.checkpoint_age(),
        oplog_headroom=stream.oplog_headroom(),
        pending=stream.window.pending(),
        in_flight=stream.window.size(),
        reconnections=stream.reconnections,
        stalled=stalled,
    )
    runner = stream.snapshot_runner
    if runner is None:
        return health
    return attrs.evolve(health, phase=runner.phase, snapshot_read=runner.read, snapshot_total=runner.total)


class DeadLetterWatch:
    """Since when every dead-letter write has failed: the unfinished event meanwhile holds
    the window shut, so nothing more is delivered until the store accepts it.

    :param note_error: records a failure as the stream's last error (``health().last_error``).
    """

    def __init__(self, note_error: Callable[[str], None]) -> None:
        self._note_error = note_error
        #: Since when (monotonic) every dead-letter write failed; None while they succeed.
        self.failing_since: float | None = None

    def outcome(self, error: BaseException | None) -> None:
        """A dead-letter write succeeded (``None``) or failed: the event stays undone meanwhile."""
        if error is None:
            self.failing_since = None
            return
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        self._note_error(
            f"dead-letter write failed ({describe(error)}); the event stays undone and holds the checkpoint"
        )

    def stall(self, after: float) -> str | None:
        """Why delivery is held back, once every write has failed for ``after`` seconds."""
        since = self.failing_since
        if since is None or time.monotonic() - since < after:
            return None
        return (
            f"every dead-letter write has failed for {time.monotonic() - since:.0f}s; delivery is held back"
        )
