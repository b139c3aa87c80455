"""mongo-events: reliable callbacks from MongoDB change streams.

At-least-once delivery with watermark checkpoints, per-document order, bounded
memory and real retries. See README.rst for the tour.
"""

from __future__ import annotations

import logging

from .bus import Bus, BusState
from .deadletters import DeadLetterHealth, DeadLetters, ReplayOutcome, ReplayResult
from .decoding import CattrsDecoder, Decoder, make_converter
from .delivery import Delivery, current_delivery
from .dispatch import DeadLetterHook
from .errors import (
    BusStateError,
    ConfigurationError,
    DecodeError,
    Duplicate,
    HandlerFailed,
    MongoEventsError,
    Reject,
    ResumeTokenLost,
    Retry,
    ShutdownTimeout,
    Skip,
    StoreError,
    StreamError,
    ThreadFailed,
)
from .events import ChangeEvent, FullDocument, OperationType, UpdateDescription
from .groups import (  # consumer groups (issue 18): Bus(group=...) and its building blocks
    FencedOut,
    FencedResumeTokenStore,
    GroupMember,
    GroupMismatch,
    LeaseStore,
    MemoryLeaseStore,
    MongoLeaseStore,
    PartitionMode,
)
from .health import Health
from .idempotency import (
    Claim,
    ClaimStatus,
    Idempotency,
    IdempotencyStore,
    MemoryIdempotencyStore,
    MongoIdempotencyStore,
    PoisonEvent,
    RedisIdempotencyStore,
)
from .metrics import Metrics
from .middleware import Middleware
from .pipeline import collection_filter

# The durable queue (last: it builds on the dispatcher and the stores above).
from .queue import MessageStore, Queue, QueueHealth, QueueStats, RedisSignal, StoredMessage
from .reporting import ErrorContext, ErrorHandler
from .retrying import RetryBackoff
from .stores import (
    AckFilter,
    AckRecord,
    AckStatus,
    AckStore,
    Checkpoint,
    DeadLetter,
    DeadLetterFilter,
    DeadLetterStats,
    DeadLetterStore,
    FileResumeTokenStore,
    MemoryAckStore,
    MemoryDeadLetterStore,
    MemoryResumeTokenStore,
    MongoAckStore,
    MongoDeadLetterStore,
    MongoResumeTokenStore,
    ResumeTokenStore,
)
from .watcher import ErrorKind, classify_error

__version__ = "0.1.0.dev0"

__all__ = [
    # the bus
    "Bus",
    "BusState",
    "Delivery",
    "current_delivery",
    "RetryBackoff",
    "Middleware",
    "DeadLetterHook",
    "ErrorContext",
    "ErrorHandler",
    # observability (the monitor store, middleware and HTTP API live in mongo_events.monitor)
    "Metrics",
    "Health",
    # the event model
    "ChangeEvent",
    "UpdateDescription",
    "OperationType",
    "FullDocument",
    "collection_filter",
    # decoding
    "Decoder",
    "CattrsDecoder",
    "make_converter",
    # stores
    "ResumeTokenStore",
    "Checkpoint",
    "MemoryResumeTokenStore",
    "MongoResumeTokenStore",
    "FileResumeTokenStore",
    "AckStore",
    "AckStatus",
    "AckRecord",
    "AckFilter",
    "MemoryAckStore",
    "MongoAckStore",
    "DeadLetterStore",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterStats",
    "MemoryDeadLetterStore",
    "MongoDeadLetterStore",
    # exactly-once effects
    "Idempotency",
    "IdempotencyStore",
    "Claim",
    "ClaimStatus",
    "MemoryIdempotencyStore",
    "MongoIdempotencyStore",
    "RedisIdempotencyStore",
    # dead letters
    "DeadLetters",
    "DeadLetterHealth",
    "ReplayOutcome",
    "ReplayResult",
    # the durable queue (mongo_events.queue)
    "Queue",
    "QueueHealth",
    "QueueStats",
    "RedisSignal",
    "MessageStore",
    "StoredMessage",
    # errors
    "MongoEventsError",
    "ConfigurationError",
    "BusStateError",
    "StreamError",
    "ResumeTokenLost",
    "DecodeError",
    "StoreError",
    "HandlerFailed",
    "ShutdownTimeout",
    "ThreadFailed",
    "Retry",
    "Reject",
    "Skip",
    "Duplicate",
    "PoisonEvent",
    "ErrorKind",
    "classify_error",
    "__version__",
    # consumer groups (issue 18)
    "LeaseStore",
    "MemoryLeaseStore",
    "MongoLeaseStore",
    "GroupMember",
    "PartitionMode",
    "FencedResumeTokenStore",
    "FencedOut",
    "GroupMismatch",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
