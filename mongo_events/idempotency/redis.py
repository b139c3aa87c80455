"""The Redis idempotency store: one hash per key, claimed by a server-side script."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from ..errors import ConfigurationError, StoreError
from .base import Claim, ClaimStatus, IdempotencyStore, check_processing_ttl
from .mongodb import OwnerId

__all__ = ["RedisIdempotencyStore"]

T = TypeVar("T")

# Times are the Redis server's clock (TIME), in milliseconds, so hosts' clocks never meet.
# KEYS[1] = key; ARGV = owner, processing ttl (ms), record ttl (ms).
_CLAIM = """
if redis.replicate_commands then redis.replicate_commands() end  -- Redis < 5: allow writes after TIME
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('HMGET', KEYS[1], 'status', 'until', 'starts')
local starts = tonumber(s[3] or '0') or 0
if s[1] == 'completed' then return {'completed', starts} end
if s[1] == 'processing' and tonumber(s[2] or '0') > now then return {'busy', starts} end
starts = redis.call('HINCRBY', KEYS[1], 'starts', 1)
redis.call('HSET', KEYS[1], 'status', 'processing', 'until', now + tonumber(ARGV[2]), 'owner', ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[2]), tonumber(ARGV[3])))
return {'claimed', starts}
"""
_COMPLETE = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'status', 'completed', 'starts', 0)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""
_RELEASE = """
local s = redis.call('HMGET', KEYS[1], 'status', 'owner')
if s[1] ~= 'processing' or s[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'released', 'until', 0)
redis.call('HINCRBY', KEYS[1], 'starts', -1)
return 1
"""


class RedisIdempotencyStore(IdempotencyStore):
    """Keys as Redis hashes ``<prefix><key>`` with ``status``, ``until``, ``owner``, ``starts``.

    Each operation is one Lua script call (one round trip), atomic on the server; claim
    expiry is judged by the Redis server's clock. A key's hash expires ``ttl`` after it
    was completed (claims live at least as long, to count unfinished starts).

    :param client: a ``redis.Redis`` client (redis-py; ``pip install 'mongo-events[redis]'``).
    :param ttl: how long a completed key is remembered.
    :param prefix: prepended to every key (the Go library's default ``"idemp:"``).

    .. versionadded:: 0.1.0
    """

    def __init__(self, client: Any, ttl: timedelta = timedelta(hours=24), prefix: str = "idemp:") -> None:
        super().__init__(ttl)
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - the test extra installs it
            raise ConfigurationError(
                "RedisIdempotencyStore needs redis-py: pip install 'mongo-events[redis]'"
            ) from exc
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError,)
        if client is None:
            raise TypeError("RedisIdempotencyStore needs a redis.Redis client")
        self.client = client
        self.prefix = prefix
        self._owner = OwnerId()
        self._claim = client.register_script(_CLAIM)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)

    @property
    def owner(self) -> str:
        """This process's name in the claims it holds."""
        return self._owner.get()

    def _ms(self, delta: timedelta) -> int:
        return max(1, int(delta.total_seconds() * 1000))

    def try_claim(self, key: str, processing_ttl: timedelta) -> Claim:
        hold = check_processing_ttl(processing_ttl)
        status, starts = self._call(
            "claim",
            key,
            lambda: self._claim(
                keys=[self.prefix + key], args=[self.owner, max(1, int(hold * 1000)), self._ms(self.ttl)]
            ),
        )
        if isinstance(status, bytes):
            status = status.decode()
        return Claim(ClaimStatus(status), int(starts))

    def complete(self, key: str) -> None:
        self._call(
            "complete", key, lambda: self._complete(keys=[self.prefix + key], args=[self._ms(self.ttl)])
        )

    def release(self, key: str) -> None:
        self._call("release", key, lambda: self._release(keys=[self.prefix + key], args=[self.owner]))

    def remove(self, key: str) -> None:
        self._call("remove", key, lambda: self.client.delete(self.prefix + key))

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except self._errors as exc:
            raise StoreError(f"redis idempotency store: {what} {self.prefix}{key!r} failed: {exc}") from exc

    def __repr__(self) -> str:
        return f"<RedisIdempotencyStore prefix={self.prefix!r} ttl={self.ttl}>"
