"""The resume-token store contract."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs
from bson.timestamp import Timestamp

__all__ = ["Checkpoint", "ResumeTokenStore"]


@attrs.frozen
class Checkpoint:
    """A stored resume position.

    :ivar token: the resume token document (``{"_data": ...}``).
    :ivar cluster_time: cluster time of the newest finished event, when known.
    :ivar updated_at: when it was written (UTC).
    """

    token: Mapping[str, Any]
    cluster_time: Timestamp | None = None
    updated_at: datetime | None = None


class ResumeTokenStore(abc.ABC):
    """Keeps one resume token per key (``"<namespace>:<id>"``).

    Only the bus's flusher thread writes; ``load`` is called at start. Every
    method raises :class:`mongo_events.StoreError` when the backend fails:
    a failed load must never look like "no token".

    .. versionadded:: 0.1.0
    """

    @abc.abstractmethod
    def load(self, key: str) -> Checkpoint | None:
        """The stored checkpoint, or ``None`` when there is none."""

    @abc.abstractmethod
    def save(self, key: str, token: Mapping[str, Any], cluster_time: Timestamp | None = None) -> None:
        """Store ``token`` as the position for ``key``."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Forget the position for ``key`` (no error when there is none)."""

    def ensure_indexes(self) -> None:  # noqa: B027 - optional hook with a sensible default
        """Create the indexes the store needs (called by ``Bus.start()``)."""

    def close(self) -> None:  # noqa: B027
        """Release resources (called by ``Bus.stop()``)."""
