"""The dead-letter manager: query, replay, quarantine and clean up dead letters."""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal

import attrs

from .errors import ConfigurationError, StoreError
from .stores.base import DeadLetterStore
from .stores.records import DeadLetter, DeadLetterFilter, DeadLetterStats

if TYPE_CHECKING:
    from .bus import Bus
    from .metrics import Metrics

__all__ = ["DeadLetters", "DeadLetterHealth", "ReplayOutcome", "ReplayResult"]

log = logging.getLogger(__name__)


class ReplayOutcome(str, enum.Enum):
    """What happened to one dead letter on replay."""

    REPLAYED = "replayed"  #: the callback succeeded; ``retried_at`` is set
    FAILED = "failed"  #: the callback failed again; ``replay_count`` grew
    QUARANTINED = "quarantined"  #: set aside: a terminal error, or too many failed replays
    SKIPPED = "skipped"  #: already replayed or quarantined, or no subscription to replay it


@attrs.frozen
class DeadLetterHealth:
    """What :meth:`DeadLetters.health` found (Go's ``Manager.Health``).

    :ivar status: ``healthy`` (nothing waits for replay), ``degraded`` (letters wait for
        replay: not replayed, not quarantined) or ``unhealthy`` (the store cannot be read).
    :ivar pending: letters waiting for replay.
    :ivar quarantined: letters set aside.
    :ivar total: all letters.
    :ivar error: why the store could not be read, when unhealthy.

    .. versionadded:: 0.1.0
    """

    status: Literal["healthy", "degraded", "unhealthy"]
    pending: int = 0
    quarantined: int = 0
    total: int = 0
    error: str | None = None

    @property
    def healthy(self) -> bool:
        """True unless ``status`` is ``unhealthy``."""
        return self.status != "unhealthy"

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


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
    :param metrics: counts replays, replay failures and quarantines (the ``dlq.*``
        instruments of :class:`mongo_events.Metrics`); default: the bus's ``metrics``.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        store: DeadLetterStore,
        bus: Bus | None = None,
        *,
        max_replay_attempts: int = 3,
        is_terminal: Callable[[BaseException], bool] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if max_replay_attempts < 1:
            raise ConfigurationError("max_replay_attempts must be at least 1")
        self.store = store
        self.bus = bus
        self.max_replay_attempts = max_replay_attempts
        self.is_terminal = is_terminal
        self.metrics = metrics if metrics is not None else (bus.metrics if bus is not None else None)

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

    def health(self) -> DeadLetterHealth:
        """``degraded`` while letters wait for replay, ``unhealthy`` when the store cannot be read."""
        try:
            pending = self.store.count(DeadLetterFilter(exclude_retried=True, exclude_quarantined=True))
            total = self.store.count()
            quarantined = total - self.store.count(DeadLetterFilter(exclude_quarantined=True))
        except StoreError as exc:
            return DeadLetterHealth("unhealthy", error=str(exc))
        return DeadLetterHealth("degraded" if pending else "healthy", pending, quarantined, total)

    # -- quarantine ---------------------------------------------------------------

    def quarantine(self, letter_id: str, reason: str = "manual") -> None:
        """Set one letter aside by hand: :meth:`replay` leaves it alone until :meth:`unquarantine`.

        :raises KeyError: when there is no such letter.
        """
        if not reason:
            raise ValueError("give a reason for the quarantine")
        letter = self.store.get(letter_id)
        if letter is None or not self.store.set_quarantine(letter_id, reason):
            raise KeyError(f"no dead letter {letter_id!r}")
        log.warning("dead letter %s quarantined by hand: %s", letter_id, reason)
        if self.metrics is not None:
            self.metrics.dead_letter_quarantined(letter.event_name, "manual")

    def unquarantine(self, letter_id: str) -> None:
        """Lift a quarantine: the letter can be replayed again (``replay_count`` is kept).

        :raises KeyError: when there is no such letter.
        """
        if not self.store.set_quarantine(letter_id, None):
            raise KeyError(f"no dead letter {letter_id!r}")
        log.info("dead letter %s released from quarantine", letter_id)

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

    def replay(
        self,
        filter: DeadLetterFilter = DeadLetterFilter(exclude_retried=True, exclude_quarantined=True),  # noqa: B008
    ) -> ReplayResult:
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
            raise ConfigurationError(
                "replay needs the bus whose subscriptions handle the letters: DeadLetters(store, bus)"
            )
        return self.bus

    def _replay(self, letter: DeadLetter) -> ReplayOutcome:
        bus = self._require_bus()
        if letter.retried_at is not None or letter.quarantined_at is not None:
            return ReplayOutcome.SKIPPED
        if not bus.has_subscription(letter.event_name):
            log.warning(
                "dead letter %s: bus %r has no subscription %r to replay it",
                letter.id,
                bus.name,
                letter.event_name,
            )
            return ReplayOutcome.SKIPPED
        if "_id" not in letter.payload or "operationType" not in letter.payload:
            log.warning(
                "dead letter %s holds no change document (written by the Go library?); it cannot be replayed here",
                letter.id,
            )
            return ReplayOutcome.SKIPPED
        error = bus.replay(letter)
        now = datetime.now(timezone.utc)
        metrics = self.metrics
        if error is None:
            self.store.update(letter.id, retried_at=now)
            if metrics is not None:
                metrics.dead_letter_replayed(letter.event_name)
            return ReplayOutcome.REPLAYED
        attempts = letter.replay_count + 1
        if metrics is not None:
            metrics.dead_letter_replay_failed(letter.event_name)
        terminal = self.is_terminal is not None and self.is_terminal(error)
        self.store.update(letter.id, replay_count=attempts)
        if terminal or attempts >= self.max_replay_attempts:
            reason = "terminal_error" if terminal else "max_replay_attempts"
            self.store.set_quarantine(letter.id, reason)
            log.error(
                "dead letter %s quarantined after %d replay(s) (%s): %r", letter.id, attempts, reason, error
            )
            if metrics is not None:
                metrics.dead_letter_quarantined(letter.event_name, reason)
            return ReplayOutcome.QUARANTINED
        return ReplayOutcome.FAILED
