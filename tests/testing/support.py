"""Shared pieces of the fake-replica-set tests: clients, a command listener, draining a stream."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pymongo
from pymongo import monitoring

from ..conftest import CLIENT_OPTIONS


class Listener(monitoring.CommandListener):
    """Records every command a client sends and every failure reply it gets."""

    def __init__(self) -> None:
        self.started_events: list[monitoring.CommandStartedEvent] = []
        self.failures: list[monitoring.CommandFailedEvent] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.started_events.append(event)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.failures.append(event)

    def of(self, name: str) -> list[dict[str, Any]]:
        return [e.command for e in self.started_events if e.command_name == name]


def client(uri: str, **kw: Any) -> pymongo.MongoClient[Any]:
    return pymongo.MongoClient(uri, **{**CLIENT_OPTIONS, **kw})


def app_name() -> str:
    """A unique application name, so a fail point hits only this test's client (servers share them)."""
    return f"t-{uuid.uuid4().hex[:10]}"


def drain(stream: Any, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        doc = stream.try_next()
        if doc is not None:
            out.append(doc)
        elif not stream.alive:
            break
    return out
