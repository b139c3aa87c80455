"""Records and filters shared by the ack and dead-letter stores."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs

__all__ = [
    "AckStatus",
    "AckRecord",
    "AckFilter",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterStats",
    "MAX_LIMIT",
]

#: The most records one ``list`` call returns.
MAX_LIMIT = 1000


def _check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")


class AckStatus(str, enum.Enum):
    """Whether an event is still being handled or done for every subscription."""

    PENDING = "pending"
    ACKED = "acked"


@attrs.frozen
class AckRecord:
    """One tracked event: ``{_id: event id, created_at, acked_at}`` (``acked_at`` is ``None`` while pending)."""

    event_id: str
    created_at: datetime
    acked_at: datetime | None = None

    @property
    def status(self) -> AckStatus:
        return AckStatus.PENDING if self.acked_at is None else AckStatus.ACKED


@attrs.frozen
class AckFilter:
    """Which ack records to list or count.

    :ivar status: pending or acked (default: both).
    :ivar start: ``created_at`` at or after this (inclusive).
    :ivar end: ``created_at`` before this (exclusive).
    :ivar limit: at most this many (1 to 1,000; default 100).
    :ivar offset: skip this many first (oldest first).
    """

    status: AckStatus | None = None
    start: datetime | None = None
    end: datetime | None = None
    limit: int = 100
    offset: int = 0

    def __attrs_post_init__(self) -> None:
        _check_page(self.limit, self.offset)

    def matches(self, record: AckRecord) -> bool:
        if self.status is not None and record.status is not self.status:
            return False
        if self.start is not None and record.created_at < self.start:
            return False
        return not (self.end is not None and record.created_at >= self.end)


@attrs.frozen
class DeadLetter:
    """An event a subscription gave up on (the event-dlq document shape).

    :ivar id: the dead letter's own id.
    :ivar event_name: the subscription that gave up.
    :ivar original_id: the change event's id (its resume token ``_data``).
    :ivar payload: the raw change document, as received.
    :ivar metadata: bus, namespace, operation, document key, cluster time.
    :ivar error: what went wrong (for decode errors, the readable paths).
    :ivar retry_count: retries (attempts after the first) made before giving up, as a monitor
        entry's ``retry_count``; with deduplication, summed over each time the event was dead-lettered.
    :ivar source: the bus's name.
    :ivar replay_count: failed replays so far.
    :ivar retried_at: when a replay succeeded.
    :ivar quarantined_at: when it was set aside for good (terminal error, or too many replays).
    :ivar quarantine_reason: why: ``terminal_error``, ``max_replay_attempts``, or the reason
        given to :meth:`mongo_events.DeadLetters.quarantine`.
    """

    id: str
    event_name: str
    original_id: str
    payload: Mapping[str, Any]
    metadata: Mapping[str, Any]
    error: str
    retry_count: int
    source: str
    created_at: datetime
    replay_count: int = 0
    retried_at: datetime | None = None
    quarantined_at: datetime | None = None
    quarantine_reason: str | None = None


@attrs.frozen
class DeadLetterFilter:
    """Which dead letters to list, count, replay or delete.

    :ivar error: a substring of the error text, matched ignoring case (as Go's event-dlq does).
    :ivar max_retries: ``retry_count`` at most this.
    :ivar exclude_retried: leave out those replayed successfully.
    :ivar exclude_quarantined: leave out quarantined ones.
    :ivar start: ``created_at`` at or after (inclusive); ``end``: before (exclusive).
    """

    event_name: str | None = None
    source: str | None = None
    error: str | None = None
    max_retries: int | None = None
    exclude_retried: bool = False
    exclude_quarantined: bool = False
    start: datetime | None = None
    end: datetime | None = None
    limit: int = 100
    offset: int = 0

    def __attrs_post_init__(self) -> None:
        _check_page(self.limit, self.offset)

    def matches(self, letter: DeadLetter) -> bool:
        checks = (
            self.event_name is None or letter.event_name == self.event_name,
            self.source is None or letter.source == self.source,
            self.error is None or self.error.casefold() in letter.error.casefold(),
            self.max_retries is None or letter.retry_count <= self.max_retries,
            not (self.exclude_retried and letter.retried_at is not None),
            not (self.exclude_quarantined and letter.quarantined_at is not None),
            self.start is None or letter.created_at >= self.start,
            self.end is None or letter.created_at < self.end,
        )
        return all(checks)


@attrs.frozen
class DeadLetterStats:
    """Totals over a dead-letter store."""

    total: int
    pending: int
    retried: int
    quarantined: int
    by_event: Mapping[str, int]
    by_error: Mapping[str, int]
    oldest: datetime | None
    newest: datetime | None
