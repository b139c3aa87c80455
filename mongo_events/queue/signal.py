"""The Redis doorbell: a publish rings idle consumers at once (Go's composite signal transport).

Redis carries no message: a lost ring only delays a message until the next poll,
so Redis being down costs latency, never a message.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Collection
from typing import Any

__all__ = ["RedisSignal"]

log = logging.getLogger(__name__)


class RedisSignal:
    """Wake-up signals over Redis pub/sub, one channel per event: ``<prefix><event>``.

    :param url_or_client: a Redis URL (``redis://host:port/db``) or a ``redis.Redis`` client.
    :param prefix: the channel prefix (Go's ``WithSignalPrefix`` default ``"_sig:"``).
    """

    def __init__(self, url_or_client: Any, prefix: str = "_sig:") -> None:
        import redis

        if isinstance(url_or_client, str):
            self._client: Any = redis.Redis.from_url(
                url_or_client, socket_connect_timeout=1.0, socket_timeout=2.0
            )
        else:
            self._client = url_or_client
        self.prefix = prefix
        self._healthy = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pubsub: Any = None

    @property
    def healthy(self) -> bool:
        """Whether the listener is subscribed right now (False before :meth:`listen` or while Redis is down)."""
        return self._healthy.is_set()

    def channel(self, event: str) -> str:
        return f"{self.prefix}{event}"

    def ring(self, event: str, message_id: str) -> None:
        """Tell listeners that ``event`` has a new message; raises the Redis error on failure."""
        self._client.publish(self.channel(event), message_id)

    def listen(self, events: Collection[str], wake: Callable[[str], None]) -> None:
        """Call ``wake(event)`` on every ring of ``events``, from a daemon thread, until :meth:`close`.

        After a lost connection it reconnects with backoff, then calls ``wake`` for
        every event (rings may have been missed meanwhile).
        """
        channels = {self.channel(e): e for e in events}
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(channels, wake), name="mongo_events.queue-signal", daemon=True
        )
        self._thread.start()

    def _run(self, channels: dict[str, str], wake: Callable[[str], None]) -> None:
        delay = 0.1
        first = True
        while not self._stop.is_set():
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                self._pubsub = pubsub
                pubsub.subscribe(*channels)
                self._healthy.set()
                if not first:
                    log.info("queue signal: Redis is back; consumers are woken")
                    for event in channels.values():
                        wake(event)
                first = False
                delay = 0.1
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message.get("type") == "message":
                        channel = message["channel"]
                        name = channels.get(channel.decode() if isinstance(channel, bytes) else channel)
                        if name is not None:
                            wake(name)
            except Exception as exc:
                if self._stop.is_set():
                    break
                if self._healthy.is_set() or first:
                    log.warning("queue signal: Redis unavailable (%s); consumers poll until it is back", exc)
                self._healthy.clear()
                first = False
                self._stop.wait(delay * random.uniform(0.9, 1.1))
                delay = min(delay * 2, 5.0)
            finally:
                self._close_pubsub()
        self._healthy.clear()

    def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:
                pass

    def close(self, timeout: float = 2.0) -> None:
        """Stop listening (the listener ends within ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._healthy.clear()
