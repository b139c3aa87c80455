"""In-memory stores, for tests and single-process scripts."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import attrs
from bson.timestamp import Timestamp

from .base import AckStore, Checkpoint, DeadLetterStore, ResumeTokenStore
from .records import AckFilter, AckRecord, DeadLetter, DeadLetterFilter

__all__ = ["MemoryResumeTokenStore", "MemoryAckStore", "MemoryDeadLetterStore"]


class MemoryResumeTokenStore(ResumeTokenStore):
    """Keeps tokens in a dict: positions last as long as the process.

    :ivar saves: number of ``save`` calls, for tests that count writes.

    .. versionadded:: 0.1.0
    """

    def __init__(self) -> None:
        self._data: dict[str, Checkpoint] = {}
        self._lock = threading.Lock()
        self.saves = 0

    def load(self, key: str) -> Checkpoint | None:
        with self._lock:
            return self._data.get(key)

    def save(
        self,
        key: str,
        token: Mapping[str, Any],
        cluster_time: Timestamp | None = None,
        *,
        namespace: str | None = None,
        level: str | None = None,
    ) -> None:
        with self._lock:
            self._data[key] = Checkpoint(
                dict(token), cluster_time, datetime.now(timezone.utc), namespace, level
            )
            self.saves += 1

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)


class MemoryAckStore(AckStore):
    """Ack records in a dict, for tests and single-process use.

    :ivar writes: number of ``write`` batches, for tests that count round trips.

    .. versionadded:: 0.1.0
    """

    def __init__(self) -> None:
        self._records: dict[str, AckRecord] = {}
        self._lock = threading.Lock()
        self.writes = 0

    def write(self, records: Sequence[AckRecord]) -> None:
        with self._lock:
            self.writes += 1
            for record in records:
                old = self._records.get(record.event_id)
                created = old.created_at if old is not None else record.created_at
                acked = record.acked_at if record.acked_at is not None else (old.acked_at if old else None)
                self._records[record.event_id] = AckRecord(record.event_id, created, acked)

    def get(self, event_id: str) -> AckRecord | None:
        with self._lock:
            return self._records.get(event_id)

    def _matching(self, filter: AckFilter) -> list[AckRecord]:
        with self._lock:
            found = [r for r in self._records.values() if filter.matches(r)]
        return sorted(found, key=lambda r: (r.created_at, r.event_id))

    def list(self, filter: AckFilter = AckFilter()) -> list[AckRecord]:  # noqa: B008
        return self._matching(filter)[filter.offset : filter.offset + filter.limit]

    def count(self, filter: AckFilter = AckFilter()) -> int:  # noqa: B008
        return len(self._matching(filter))


class MemoryDeadLetterStore(DeadLetterStore):
    """Dead letters in a dict, for tests and single-process use.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *, dedup: bool = True) -> None:
        super().__init__(dedup=dedup)
        self._letters: dict[str, DeadLetter] = {}
        self._lock = threading.Lock()

    def store(self, letter: DeadLetter) -> str:
        with self._lock:
            if self.dedup:
                for existing in self._letters.values():
                    if (
                        existing.event_name == letter.event_name
                        and existing.original_id == letter.original_id
                    ):
                        self._letters[existing.id] = attrs.evolve(
                            existing,
                            retry_count=existing.retry_count + letter.retry_count,
                            error=letter.error,
                        )
                        return existing.id
            self._letters[letter.id] = letter
            return letter.id

    def get(self, letter_id: str) -> DeadLetter | None:
        with self._lock:
            return self._letters.get(letter_id)

    def get_by_original_id(self, original_id: str) -> DeadLetter | None:
        with self._lock:
            found = [d for d in self._letters.values() if d.original_id == original_id]
        return max(found, key=lambda d: d.created_at) if found else None

    def _matching(self, filter: DeadLetterFilter) -> list[DeadLetter]:
        with self._lock:
            found = [d for d in self._letters.values() if filter.matches(d)]
        return sorted(found, key=lambda d: (d.created_at, d.id))

    def list(self, filter: DeadLetterFilter = DeadLetterFilter()) -> list[DeadLetter]:  # noqa: B008
        return self._matching(filter)[filter.offset : filter.offset + filter.limit]

    def count(self, filter: DeadLetterFilter = DeadLetterFilter()) -> int:  # noqa: B008
        return len(self._matching(filter))

    def update(
        self,
        letter_id: str,
        *,
        retried_at: datetime | None = None,
        quarantined_at: datetime | None = None,
        replay_count: int | None = None,
    ) -> None:
        with self._lock:
            letter = self._letters.get(letter_id)
            if letter is None:
                return
            changes: dict[str, Any] = {}
            if retried_at is not None:
                changes["retried_at"] = retried_at
            if quarantined_at is not None:
                changes["quarantined_at"] = quarantined_at
            if replay_count is not None:
                changes["replay_count"] = replay_count
            self._letters[letter_id] = attrs.evolve(letter, **changes)

    def set_quarantine(self, letter_id: str, reason: str | None) -> bool:
        with self._lock:
            letter = self._letters.get(letter_id)
            if letter is None:
                return False
            at = datetime.now(timezone.utc) if reason is not None else None
            self._letters[letter_id] = attrs.evolve(letter, quarantined_at=at, quarantine_reason=reason)
            return True

    def delete(self, letter_id: str) -> bool:
        with self._lock:
            return self._letters.pop(letter_id, None) is not None

    def delete_by_filter(self, filter: DeadLetterFilter) -> int:
        doomed = [d.id for d in self._matching(filter)]
        with self._lock:
            for letter_id in doomed:
                self._letters.pop(letter_id, None)
        return len(doomed)
