"""The resume-token store contract."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import attrs
from bson.timestamp import Timestamp

from ..errors import StoreError
from .records import AckFilter, AckRecord, DeadLetter, DeadLetterFilter, DeadLetterStats

__all__ = ["Checkpoint", "ResumeTokenStore", "AckStore", "DeadLetterStore"]


@attrs.frozen
class Checkpoint:
    """A stored resume position.

    :ivar token: the resume token document (``{"_data": ...}``).
    :ivar cluster_time: cluster time of the newest finished event, when known.
    :ivar updated_at: when it was written (UTC).
    :ivar namespace: what the bus that wrote it watched (``db.coll``, ``db.*``, ``*.*``);
        ``None`` in checkpoints written by the Go library or before 0.1.
    :ivar level: ``collection``, ``database`` or ``cluster``, when stored.
    """

    token: Mapping[str, Any]
    cluster_time: Timestamp | None = None
    updated_at: datetime | None = None
    namespace: str | None = None
    level: str | None = None


def token_problem(token: Any) -> str | None:
    """What is wrong with a stored resume token, or ``None`` when it looks usable.

    A resume token is a document with a ``_data`` field (a hex string, or binary on
    servers before 4.2). Anything else stored under a key is damage, not "no checkpoint".
    """
    if token is None:
        return "it has no token"
    if not isinstance(token, Mapping):
        return f"its token is a {type(token).__name__} ({_short(token)}), not a resume-token document"
    data = token.get("_data")
    if data is None:
        return f"its token {_short(token)} has no _data field"
    if isinstance(data, str):
        return None if data else "its token's _data is empty"
    if isinstance(data, (bytes, bytearray)):  # bson Binary is a bytes subclass
        return None if data else "its token's _data is empty"
    return f"its token's _data is a {type(data).__name__}, not a string"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def malformed(key: str, where: str, problem: str) -> StoreError:
    """The error for a stored checkpoint that exists but cannot be used."""
    return StoreError(
        f"the stored checkpoint {key!r} in {where} is malformed: {problem}. It was left untouched; the bus "
        "will not start from now over it, which would skip every change since. Repair or delete it "
        "(Bus.reset_resume_token() or the CLI) once you know where to resume"
    )


def stored_checkpoint(entry: Mapping[str, Any], key: str, where: str) -> Checkpoint:
    """The :class:`Checkpoint` in a stored entry (a MongoDB document or a file entry).

    :raises StoreError: when the entry's token is malformed (see :func:`token_problem`).
    """
    problem = token_problem(entry.get("token"))
    if problem is not None:
        raise malformed(key, where, problem)
    token = entry["token"]
    if entry.get("snapshot") is not None:  # an unfinished snapshot's progress, beside its T0
        from ..snapshot import loaded_token

        try:
            token = loaded_token(token, entry["snapshot"], f"{where} ({key!r})")
        except ValueError as exc:
            raise malformed(key, where, str(exc)) from None
    cluster_time = entry.get("cluster_time")
    namespace, level = entry.get("namespace"), entry.get("level")
    return Checkpoint(
        token,
        cluster_time if isinstance(cluster_time, Timestamp) else None,
        entry.get("updated_at"),
        namespace if isinstance(namespace, str) else None,
        level if isinstance(level, str) else None,
    )


class ResumeTokenStore(abc.ABC):
    """Keeps one resume token per key (``"<namespace>:<id>"``).

    Only the bus's flusher thread writes; ``load`` is called at start. Every
    method raises :class:`mongo_events.StoreError` when the backend fails:
    a failed load must never look like "no token".

    .. versionadded:: 0.1.0
    """

    @abc.abstractmethod
    def load(self, key: str) -> Checkpoint | None:
        """The stored checkpoint, or ``None`` when there is none.

        :raises StoreError: when the backend fails, or an entry exists under ``key`` but is
            malformed (see :func:`token_problem`): only a missing entry means "no checkpoint".
        """

    @abc.abstractmethod
    def save(
        self,
        key: str,
        token: Mapping[str, Any],
        cluster_time: Timestamp | None = None,
        *,
        namespace: str | None = None,
        level: str | None = None,
    ) -> None:
        """Store ``token`` as the position for ``key``, with what the bus watches.

        A store written before ``namespace`` and ``level`` existed still works: the bus
        passes them only when ``save`` accepts them.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Forget the position for ``key`` (no error when there is none)."""

    def ensure_indexes(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Create the indexes the store needs (called by ``Bus.start()``)."""

    def close(self) -> None:  # noqa: B027
        """Release resources (called by ``Bus.stop()``)."""


class AckStore(abc.ABC):
    """Tracks which events are pending and which are done (acked) for every subscription.

    The bus writes through :meth:`write` from its flusher thread, one batch per
    flush; the query methods serve dashboards and diagnosis.

    .. versionadded:: 0.1.0
    """

    @abc.abstractmethod
    def write(self, records: Sequence[AckRecord]) -> None:
        """Upsert a batch: each record sets ``created_at`` (first write wins) and ``acked_at`` if given."""

    @abc.abstractmethod
    def get(self, event_id: str) -> AckRecord | None:
        """One event's record."""

    @abc.abstractmethod
    def list(self, filter: AckFilter = AckFilter()) -> list[AckRecord]:  # noqa: B008
        """Records matching ``filter``, oldest first."""

    @abc.abstractmethod
    def count(self, filter: AckFilter = AckFilter()) -> int:  # noqa: B008
        """How many records match ``filter`` (``limit`` and ``offset`` are ignored)."""

    def pending_count(self) -> int:
        """Events received and not yet done."""
        from .records import AckStatus

        return self.count(AckFilter(status=AckStatus.PENDING))

    def ensure_indexes(self) -> None:  # noqa: B027
        """Create the indexes the store needs (called by ``Bus.start()``)."""

    def close(self) -> None:  # noqa: B027
        """Release resources."""


class DeadLetterStore(abc.ABC):
    """Keeps events that subscriptions gave up on, for diagnosis and replay.

    :param dedup: a repeat of ``(event_name, original_id)`` updates the existing
        entry (``retry_count`` grows, the error is refreshed) instead of adding one.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *, dedup: bool = True) -> None:
        self.dedup = dedup

    @abc.abstractmethod
    def store(self, letter: DeadLetter) -> str:
        """Store ``letter``; returns the id of the entry written (or updated, with ``dedup``)."""

    @abc.abstractmethod
    def get(self, letter_id: str) -> DeadLetter | None: ...

    @abc.abstractmethod
    def get_by_original_id(self, original_id: str) -> DeadLetter | None:
        """The newest entry for a change event id."""

    @abc.abstractmethod
    def list(self, filter: DeadLetterFilter = DeadLetterFilter()) -> list[DeadLetter]:  # noqa: B008
        """Entries matching ``filter``, oldest first."""

    @abc.abstractmethod
    def count(self, filter: DeadLetterFilter = DeadLetterFilter()) -> int:  # noqa: B008
        """How many entries match (``limit`` and ``offset`` are ignored)."""

    @abc.abstractmethod
    def update(
        self,
        letter_id: str,
        *,
        retried_at: datetime | None = None,
        quarantined_at: datetime | None = None,
        replay_count: int | None = None,
    ) -> None:
        """Set the given fields of one entry."""

    def set_quarantine(self, letter_id: str, reason: str | None) -> bool:
        """Quarantine one entry now with ``reason``, or (``None``) lift its quarantine.

        Returns True when the entry exists. The base class can only quarantine
        (through :meth:`update`); stores override it to record the reason and to lift it.

        .. versionadded:: 0.1.0
        """
        if reason is None:
            raise NotImplementedError(f"{type(self).__name__} cannot lift a quarantine")
        if self.get(letter_id) is None:
            return False
        self.update(letter_id, quarantined_at=datetime.now(timezone.utc))
        return True

    @abc.abstractmethod
    def delete(self, letter_id: str) -> bool:
        """Delete one entry; True when it existed."""

    @abc.abstractmethod
    def delete_by_filter(self, filter: DeadLetterFilter) -> int:
        """Delete every entry matching ``filter`` (``limit`` and ``offset`` ignored); returns how many."""

    def stats(self) -> DeadLetterStats:
        """Totals by event and error, oldest and newest, pending, retried and quarantined."""
        from collections import Counter

        total = self.count()
        by_event: Counter[str] = Counter()
        by_error: Counter[str] = Counter()
        pending = retried = quarantined = 0
        oldest = newest = None
        offset = 0
        while offset < total:
            page = self.list(DeadLetterFilter(limit=1000, offset=offset))
            if not page:
                break
            for letter in page:
                by_event[letter.event_name] += 1
                by_error[letter.error.splitlines()[0][:200] if letter.error else ""] += 1
                if letter.quarantined_at is not None:
                    quarantined += 1
                elif letter.retried_at is not None:
                    retried += 1
                else:
                    pending += 1
                oldest = letter.created_at if oldest is None or letter.created_at < oldest else oldest
                newest = letter.created_at if newest is None or letter.created_at > newest else newest
            offset += len(page)
        return DeadLetterStats(
            total, pending, retried, quarantined, dict(by_event), dict(by_error), oldest, newest
        )

    def ensure_indexes(self) -> None:  # noqa: B027
        """Create the indexes the store needs."""

    def close(self) -> None:  # noqa: B027
        """Release resources."""
