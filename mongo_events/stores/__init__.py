"""Stores: resume positions, ack records and dead letters, each an ABC with memory and MongoDB versions."""

from __future__ import annotations

from .base import AckStore, Checkpoint, DeadLetterStore, ResumeTokenStore
from .file import FileResumeTokenStore
from .memory import MemoryAckStore, MemoryDeadLetterStore, MemoryResumeTokenStore
from .mongodb import MongoAckStore, MongoDeadLetterStore, MongoResumeTokenStore
from .records import AckFilter, AckRecord, AckStatus, DeadLetter, DeadLetterFilter, DeadLetterStats

__all__ = [
    "Checkpoint",
    "ResumeTokenStore",
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
]
