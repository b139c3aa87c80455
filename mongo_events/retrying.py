"""Backoff schedules built on the ``backoff`` package's generators."""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import backoff

__all__ = ["RetryBackoff"]


@attrs.frozen
class RetryBackoff:
    """Exponential backoff from ``min`` to ``max`` seconds, doubling, with full jitter.

    With ``jitter`` each delay is drawn uniformly from ``[min, d]`` where ``d`` is the
    un-jittered delay, so many failing consumers do not retry in lockstep.

    .. versionadded:: 0.1.0
    """

    min: float = 0.1
    max: float = 30.0
    jitter: bool = True

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.min <= self.max:
            raise ValueError(f"RetryBackoff needs 0 <= min <= max, got min={self.min}, max={self.max}")

    def delays(self) -> Iterator[float]:
        """An endless iterator of delays in seconds."""
        gen = backoff.expo(base=2, factor=self.min, max_value=self.max)
        gen.send(None)  # the backoff generators are primed with one send
        for value in gen:
            yield self.min + backoff.full_jitter(value - self.min) if self.jitter else value

    def delay(self, attempt: int) -> float:
        """The delay before retry number ``attempt`` (1-based), computed without state."""
        value = min(self.max, self.min * 2 ** max(0, attempt - 1)) if self.min else 0.0
        return self.min + backoff.full_jitter(value - self.min) if self.jitter else value
