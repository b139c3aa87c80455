"""Middleware: hooks around each delivery attempt (metrics, monitor, Django connections, ...)."""

from __future__ import annotations

from .base import Middleware

__all__ = ["Middleware"]
