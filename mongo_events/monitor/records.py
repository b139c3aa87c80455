"""What the monitor records: one entry per (event, subscription), and how to query them."""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs

from ..errors import ConfigurationError

__all__ = [
    "MonitorStatus",
    "MonitorEntry",
    "MonitorFilter",
    "MonitorPage",
    "MonitorSummary",
    "EventSummary",
    "MAX_LIMIT",
]

#: Most entries one query returns.
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


class MonitorStatus(str, enum.Enum):
    """Where one subscription is with one event."""

    PENDING = "pending"  #: the callback is running (first attempt)
    COMPLETED = "completed"  #: the callback returned
    FAILED = "failed"  #: given up: dead-lettered, skipped, rejected, or the bus stopped on it
    RETRYING = "retrying"  #: an attempt failed and another is scheduled
    PUBLISHED = (
        "published"  #: Go's publish-audit entries (``subscription_id="$publish"``); never written here
    )

    def __str__(self) -> str:
        return self.value


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def rfc3339(value: datetime) -> str:
    """A UTC time as RFC 3339 with a ``Z`` suffix (the JSON form of every time we serve)."""
    return value.isoformat().replace("+00:00", "Z")


def parse_rfc3339(text: str) -> datetime:
    """The reverse of :func:`rfc3339`: an RFC 3339 / ISO 8601 time (``Z`` allowed), in UTC; a
    time without an offset is taken as UTC.

    :raises ValueError: when ``text`` is not one.
    """
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    try:
        return _utc(value)
    except OverflowError:  # 9999-12-31T23:59:59-01:00 is past the calendar's end in UTC
        raise ValueError(f"{text!r} is outside the years 1 to 9999 in UTC") from None


def now_ms() -> datetime:
    """Now in UTC, truncated to the millisecond (what MongoDB stores)."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


@attrs.define
class MonitorEntry:
    """The lifecycle of one event in one subscription.

    :ivar event_id: the change event's id (its resume token's ``_data``).
    :ivar subscription_id: the subscription's name.
    :ivar event_name: the changed namespace, ``db.coll``.
    :ivar bus_id: the bus's name.
    :ivar instance_id: the process that handled it (``host:pid`` by default).
    :ivar status: a :class:`MonitorStatus`.
    :ivar error: the last attempt's error, if any (kept after a later success).
    :ivar retry_count: retries: attempts after the first (a dead letter's ``retry_count`` means
        the same).
    :ivar started_at: when the first attempt started (UTC, whole milliseconds).
    :ivar completed_at: when it completed or failed.
    :ivar duration_ms: milliseconds from ``started_at`` to the end of the latest attempt: once
        finished, exactly ``completed_at - started_at`` (retries and their back-off included).
    :ivar trace_id: / :ivar span_id: of the span active around the callback, if any (hex).
    :ivar metadata: ``operation``, ``document_key`` and, for replays, ``replay``.
    """

    event_id: str
    subscription_id: str
    event_name: str
    bus_id: str
    status: MonitorStatus
    started_at: datetime
    instance_id: str = ""
    error: str | None = None
    retry_count: int = 0
    completed_at: datetime | None = None
    duration_ms: float | None = None
    trace_id: str | None = None
    span_id: str | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.event_id, self.subscription_id)

    def to_document(self) -> dict[str, Any]:
        """The stored shape (snake_case, as in the seed's ``monitor_entries``)."""
        doc = attrs.asdict(self, recurse=False)
        doc["status"] = self.status.value
        return {k: v for k, v in doc.items() if v is not None and v != {}}

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> MonitorEntry:
        fields = {f.name for f in attrs.fields(cls)}
        values = {k: v for k, v in doc.items() if k in fields}
        values["status"] = MonitorStatus(values["status"])
        for name in ("started_at", "completed_at"):
            if isinstance(values.get(name), datetime):
                values[name] = _utc(values[name])
        values["metadata"] = dict(values.get("metadata") or {})
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: times as RFC 3339 strings."""
        out: dict[str, Any] = {}
        for key, value in attrs.asdict(self, recurse=False).items():
            if isinstance(value, datetime):
                out[key] = rfc3339(value)
            elif isinstance(value, MonitorStatus):
                out[key] = value.value
            elif key == "metadata":
                out[key] = json.loads(json.dumps(value, default=str))
            else:
                out[key] = value
        return out


def encode_cursor(entry: MonitorEntry) -> str:
    raw = json.dumps({"s": entry.started_at.isoformat(), "e": entry.event_id, "u": entry.subscription_id})
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str, str]:
    """The (started_at, event_id, subscription_id) a page ended at.

    :raises ConfigurationError: when the cursor was not made by :func:`encode_cursor`.
    """
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return _utc(datetime.fromisoformat(data["s"])), str(data["e"]), str(data["u"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ConfigurationError(
            f"invalid monitor cursor {cursor!r}: pass next_cursor from the previous page"
        ) from exc


def _statuses(values: Iterable[MonitorStatus | str]) -> tuple[MonitorStatus, ...]:
    return tuple(MonitorStatus(v) for v in values)


@attrs.frozen
class MonitorFilter:
    """Which entries a query returns; every given field must match.

    :ivar statuses: any of these statuses.
    :ivar has_error: ``True``: an error is recorded; ``False``: none.
    :ivar start_time: ``started_at`` at or after (inclusive).
    :ivar end_time: ``started_at`` before (exclusive).
    :ivar min_duration: ``duration_ms`` at least this.
    :ivar min_retries: ``retry_count`` at least this.
    :ivar cursor: ``next_cursor`` of the previous page (keyset pagination).
    :ivar limit: page size, default 100, at most 1,000.
    :ivar order_desc: newest first.
    """

    event_id: str | None = None
    subscription_id: str | None = None
    event_name: str | None = None
    bus_id: str | None = None
    instance_id: str | None = None
    statuses: Sequence[MonitorStatus] = attrs.field(default=(), converter=_statuses)
    has_error: bool | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    min_duration: timedelta | None = None
    min_retries: int | None = None
    cursor: str | None = None
    limit: int = DEFAULT_LIMIT
    order_desc: bool = False

    def __attrs_post_init__(self) -> None:
        if self.limit < 1:
            raise ConfigurationError(f"limit must be at least 1, got {self.limit}")
        for name in ("start_time", "end_time"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _utc(value))

    @property
    def effective_limit(self) -> int:
        return min(self.limit, MAX_LIMIT)

    def matches(self, entry: MonitorEntry) -> bool:
        """Whether ``entry`` passes every field but the cursor."""
        for name in ("event_id", "subscription_id", "event_name", "bus_id", "instance_id"):
            wanted = getattr(self, name)
            if wanted is not None and getattr(entry, name) != wanted:
                return False
        if self.statuses and entry.status not in self.statuses:
            return False
        if self.has_error is not None and bool(entry.error) != self.has_error:
            return False
        if self.start_time is not None and entry.started_at < self.start_time:
            return False
        if self.end_time is not None and entry.started_at >= self.end_time:
            return False
        if (
            self.min_duration is not None
            and (entry.duration_ms or 0) < self.min_duration.total_seconds() * 1000
        ):
            return False
        return self.min_retries is None or entry.retry_count >= self.min_retries


@attrs.frozen
class MonitorPage:
    """One page of entries; pass ``next_cursor`` as the next filter's ``cursor``."""

    entries: list[MonitorEntry]
    next_cursor: str | None
    has_more: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": [e.to_json() for e in self.entries],
            "next_cursor": self.next_cursor,
            "has_more": self.has_more,
        }


@attrs.frozen
class EventSummary:
    """Counts for one ``event_name``."""

    total: int
    completed: int
    failed: int
    retrying: int
    pending: int
    avg_duration_ms: float
    error_rate: float


@attrs.frozen
class MonitorSummary:
    """Totals over a time range (default: the last 24 hours)."""

    total_entries: int
    by_status: dict[str, int]
    by_event_name: dict[str, EventSummary]
    by_instance: dict[str, int]
    avg_duration_ms: float
    error_rate: float
    oldest: datetime | None
    newest: datetime | None

    def to_json(self) -> dict[str, Any]:
        def iso(value: datetime | None) -> str | None:
            return rfc3339(value) if value else None

        return {
            "total_entries": self.total_entries,
            "by_status": self.by_status,
            "by_event_name": {k: attrs.asdict(v) for k, v in self.by_event_name.items()},
            "by_instance": self.by_instance,
            "avg_duration_ms": self.avg_duration_ms,
            "error_rate": self.error_rate,
            "time_range": {"oldest": iso(self.oldest), "newest": iso(self.newest)},
        }


def summarize(
    rows: Iterable[tuple[str, str, str, int, float, int]], oldest: datetime | None, newest: datetime | None
) -> MonitorSummary:
    """Build a summary from ``(event_name, status, instance_id, count, duration_sum_ms, durations)`` rows."""
    by_status: dict[str, int] = {}
    by_instance: dict[str, int] = {}
    per_event: dict[str, dict[str, float]] = {}
    total = failed = 0
    dsum = 0.0
    dcount = 0
    for event_name, status, instance, n, duration_sum, durations in rows:
        total += n
        by_status[status] = by_status.get(status, 0) + n
        if instance:
            by_instance[instance] = by_instance.get(instance, 0) + n
        acc = per_event.setdefault(
            event_name, {"total": 0, "dsum": 0.0, "dn": 0, **{s.value: 0 for s in MonitorStatus}}
        )
        acc["total"] += n
        acc[status] = acc.get(status, 0) + n
        acc["dsum"] += duration_sum
        acc["dn"] += durations
        dsum += duration_sum
        dcount += durations
        if status == MonitorStatus.FAILED.value:
            failed += n
    by_event = {
        name: EventSummary(
            total=int(acc["total"]),
            completed=int(acc["completed"]),
            failed=int(acc["failed"]),
            retrying=int(acc["retrying"]),
            pending=int(acc["pending"]),
            avg_duration_ms=round(acc["dsum"] / acc["dn"], 3) if acc["dn"] else 0.0,
            error_rate=round(acc["failed"] / acc["total"], 4) if acc["total"] else 0.0,
        )
        for name, acc in per_event.items()
    }
    return MonitorSummary(
        total_entries=total,
        by_status=by_status,
        by_event_name=by_event,
        by_instance=by_instance,
        avg_duration_ms=round(dsum / dcount, 3) if dcount else 0.0,
        error_rate=round(failed / total, 4) if total else 0.0,
        oldest=oldest,
        newest=newest,
    )
