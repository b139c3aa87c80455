"""What ``Bus.health()`` reports: one snapshot of a bus's state for probes and dashboards."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

import attrs

from .monitor.records import rfc3339

__all__ = ["Health", "token_time"]

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
