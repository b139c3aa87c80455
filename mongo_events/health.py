"""What ``Bus.health()`` reports: one snapshot of a bus's state for probes and dashboards.

Also the oplog window (how far back the oplog reaches, read now and then) and the rule
that turns a stream's state into ``healthy``, ``degraded`` or ``unhealthy``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Literal

import attrs
from bson.timestamp import Timestamp
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from .monitor.records import rfc3339

__all__ = ["Health", "OplogWindow", "assess", "token_time"]

log = logging.getLogger(__name__)

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
            self.oldest = None
            self._checked = now + 600.0  # not allowed now is unlikely to change soon
            return
        ts = oldest.get("ts") if oldest else None
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
