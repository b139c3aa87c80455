"""Idempotency stores (claim, then complete or release) and the guard a subscription runs them with."""

from __future__ import annotations

from .base import Claim, ClaimStatus, IdempotencyStore
from .guard import Idempotency, PoisonEvent
from .memory import MemoryIdempotencyStore
from .mongodb import MongoIdempotencyStore
from .redis import RedisIdempotencyStore

__all__ = [
    "IdempotencyStore",
    "Claim",
    "ClaimStatus",
    "MemoryIdempotencyStore",
    "MongoIdempotencyStore",
    "RedisIdempotencyStore",
    "Idempotency",
    "PoisonEvent",
]
