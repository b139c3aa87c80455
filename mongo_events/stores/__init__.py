"""Stores: where a bus keeps its resume position (and, later, acks and dead letters)."""

from __future__ import annotations

from .base import Checkpoint, ResumeTokenStore
from .file import FileResumeTokenStore
from .memory import MemoryResumeTokenStore
from .mongodb import MongoResumeTokenStore

__all__ = [
    "Checkpoint",
    "FileResumeTokenStore",
    "MemoryResumeTokenStore",
    "MongoResumeTokenStore",
    "ResumeTokenStore",
]
