"""Integrations: Flask (``mongo_events.contrib.flask``) and Django (``mongo_events.contrib.django``)."""

from __future__ import annotations

from .registry import BusRegistry, build_bus

__all__ = ["BusRegistry", "build_bus"]
