"""The monitor: one entry per (event, subscription), its stores, middleware, consumer
statuses, and the HTTP API and dashboard."""

from __future__ import annotations

from .middleware import MonitorMiddleware
from .mongodb import MongoMonitorStore
from .records import EventSummary, MonitorEntry, MonitorFilter, MonitorPage, MonitorStatus, MonitorSummary
from .status import (
    ConsumerStatus,
    ConsumerStatusStore,
    GroupView,
    MemoryConsumerStatusStore,
    MongoConsumerStatusStore,
    StatusPublisher,
    group_views,
)
from .store import MemoryMonitorStore, MonitorStore
from .wsgi import parse_duration, wsgi_app

__all__ = [
    "MonitorStore",
    "MemoryMonitorStore",
    "MongoMonitorStore",
    "MonitorMiddleware",
    "MonitorEntry",
    "MonitorFilter",
    "MonitorPage",
    "MonitorStatus",
    "MonitorSummary",
    "EventSummary",
    "ConsumerStatus",
    "ConsumerStatusStore",
    "MemoryConsumerStatusStore",
    "MongoConsumerStatusStore",
    "StatusPublisher",
    "GroupView",
    "group_views",
    "wsgi_app",
    "parse_duration",
]
