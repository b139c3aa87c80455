"""The durable publish/subscribe queue: a MongoDB message store, competing consumers, a Redis doorbell.

``Queue(collection, signal=RedisSignal(url))`` is Go's ``persistent.NewStore`` +
``composite.New`` with a Redis signal transport, without Go's checkpoint (consumers
find work by status, so a nacked message is never passed over).
"""

from __future__ import annotations

from .queue import Queue, QueueHealth
from .signal import RedisSignal
from .store import MessageStore, QueueStats, StoredMessage

__all__ = ["MessageStore", "Queue", "QueueHealth", "QueueStats", "RedisSignal", "StoredMessage"]
