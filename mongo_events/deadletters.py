"""The dead-letter manager: query, replay, quarantine and clean up dead letters."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import attrs

from .errors import ConfigurationError
from .stores.base import DeadLetterStore
from .stores.records import DeadLetter, DeadLetterFilter, DeadLetterStats

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["DeadLetters", "ReplayOutcome", "ReplayResult"]

log = logging.getLogger(__name__)


class ReplayOutcome(str, enum.Enum):
    """What happened to one dead letter on replay."""

    REPLAYED = "replayed"        #: the callback succeeded; ``retried_at`` is set
    FAILED = "failed"            #: the callback failed again; ``replay_count`` grew
    QUARANTINED = "quarantined"  #: set aside: a terminal error, or too many failed replays
    SKIPPED = "skipped"          #: already replayed or quarantined, or no subscription to replay it


@attrs.frozen
class ReplayResult:
    """Totals of a :meth:`DeadLetters.replay` run."""

    replayed: int = 0
    failed: int = 0
    quarantined: int = 0
    skipped: int = 0


class DeadLetters:
    """Works with the dead letters of one store, replaying them through a bus's subscriptions.

    :param store: the dead-letter store.
    :param bus: the bus whose subscription (``event_name``) replays each letter,
        with the same callback, decoder and middleware; it need not be running.
    :param max_replay_attempts: failed replays before a letter is quarantined.
    :param is_terminal: ``fn(error) -> bool``; True quarantines at once.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        store: DeadLetterStore,
        bus: Bus | None = None,
        *,
        max_replay_attempts: int = 3,
        is_terminal: Callable[[BaseException], bool] | None = None,
    ) -> None:
        if max_replay_attempts < 1:
            raise ConfigurationError("max_replay_attempts must be at least 1")
        self.store = store
        self.bus = bus
        self.max_replay_attempts = max_replay_attempts
        self.is_terminal = is_terminal

    # -- queries -------------------------------------------------------------

    def get(self, letter_id: str) -> DeadLetter | None:
        return self.store.get(letter_id)

    def get_by_original_id(self, original_id: str) -> DeadLetter | None:
        """The newest dead letter of a change event id."""
        return self.store.get_by_original_id(original_id)

    def list(self, filter: DeadLetterFilter = DeadLetterFilter()) -> list[DeadLetter]:  # noqa: B008
        return self.store.list(filter)

    def count(self, filter: DeadLetterFilter = DeadLetterFilter()) -> int:  # noqa: B008
        return self.store.count(filter)

    def stats(self) -> DeadLetterStats:
        return self.store.stats()

    # -- changes ------------------------------------------------------------------

    def delete(self, letter_id: str) -> bool:
        return self.store.delete(letter_id)

    def delete_by_filter(self, filter: DeadLetterFilter) -> int:
        return self.store.delete_by_filter(filter)

    def cleanup(self, older_than: timedelta) -> int:
        """Delete dead letters created more than ``older_than`` ago; returns how many."""
        return self.store.delete_by_filter(DeadLetterFilter(end=datetime.now(timezone.utc) - older_than))

    def replay_one(self, letter_id: str) -> ReplayOutcome:
        """Deliver one dead letter again through its subscription's callback."""
        self._require_bus()
        letter = self.store.get(letter_id)
        if letter is None:
            raise KeyError(f"no dead letter {letter_id!r}")
        return self._replay(letter)

    def replay(self, filter: DeadLetterFilter = DeadLetterFilter(exclude_retried=True, exclude_quarantined=True)) -> ReplayResult:  # noqa: B008
        """Replay every dead letter matching ``filter`` (by default: not yet replayed or quarantined)."""
        self._require_bus()
        counts = dict.fromkeys(ReplayOutcome, 0)
        for letter in self.store.list(filter):
            counts[self._replay(letter)] += 1
        return ReplayResult(
            replayed=counts[ReplayOutcome.REPLAYED],
            failed=counts[ReplayOutcome.FAILED],
            quarantined=counts[ReplayOutcome.QUARANTINED],
            skipped=counts[ReplayOutcome.SKIPPED],
        )

    def _require_bus(self) -> Bus:
        if self.bus is None:
            raise ConfigurationError("replay needs the bus whose subscriptions handle the letters: DeadLetters(store, bus)")
        return self.bus

    def _replay(self, letter: DeadLetter) -> ReplayOutcome:
        bus = self._require_bus()
        if letter.retried_at is not None or letter.quarantined_at is not None:
            return ReplayOutcome.SKIPPED
        if not bus.has_subscription(letter.event_name):
            log.warning("dead letter %s: bus %r has no subscription %r to replay it", letter.id, bus.name, letter.event_name)
            return ReplayOutcome.SKIPPED
        error = bus.replay(letter)
        now = datetime.now(timezone.utc)
        if error is None:
            self.store.update(letter.id, retried_at=now)
            return ReplayOutcome.REPLAYED
        attempts = letter.replay_count + 1
        if (self.is_terminal is not None and self.is_terminal(error)) or attempts >= self.max_replay_attempts:
            self.store.update(letter.id, replay_count=attempts, quarantined_at=now)
            log.error("dead letter %s quarantined after %d replay(s): %r", letter.id, attempts, error)
            return ReplayOutcome.QUARANTINED
        self.store.update(letter.id, replay_count=attempts)
        return ReplayOutcome.FAILED
