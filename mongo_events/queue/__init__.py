"""The durable publish/subscribe queue: a MongoDB message store, competing consumers, a Redis doorbell."""

from __future__ import annotations

from .store import MessageStore, QueueStats, StoredMessage

__all__ = ["MessageStore", "QueueStats", "StoredMessage"]
