"""The monitor's HTTP API as a WSGI application (mount it in Flask, Django or any WSGI server).

Routes (the seed's, under ``/v1``)::

    GET    /v1/monitor/entries                          list (filters, keyset cursor)
    DELETE /v1/monitor/entries?older_than=24h[&force=true]
    GET    /v1/monitor/entries/count
    GET    /v1/monitor/entries/{event_id}
    GET    /v1/monitor/entries/{event_id}/{subscription_id}
    GET    /v1/monitor/summary
    GET    /v1/health                                   (when given ``health``)

Responses are JSON; errors are ``{"error": "..."}`` with 400 (bad parameter),
404, 405 (wrong method), 500 (store failure) or 503 (unhealthy).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from ..errors import ConfigurationError, StoreError
from .records import MAX_LIMIT, MonitorFilter, MonitorStatus, decode_cursor, parse_rfc3339
from .store import MonitorStore

__all__ = ["wsgi_app", "parse_duration"]

log = logging.getLogger(__name__)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_STATUS_TEXT = {
    200: "200 OK",
    400: "400 Bad Request",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    500: "500 Internal Server Error",
    501: "501 Not Implemented",
    503: "503 Service Unavailable",
}


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


#: The longest duration accepted (a century): longer ones only overflow date arithmetic.
MAX_DURATION = timedelta(days=36_500)


def parse_duration(text: str) -> timedelta:
    """A Go-style duration (``"90s"``, ``"1h30m"``, ``"250ms"``, ``"7d"``) or plain seconds,
    from zero to a century (:data:`MAX_DURATION`).

    :raises ValueError: when ``text`` is not one (``inf``, ``nan``, negative or too long included).
    """
    text = text.strip()
    try:
        total = float(text)
    except ValueError:
        pos = 0
        total = 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 24h, 1h30m)") from None
    if not math.isfinite(total) or total < 0:
        raise ValueError(f"not a duration: {text!r} (use a finite, non-negative one, e.g. 30s, 15m, 24h)")
    if total > MAX_DURATION.total_seconds():
        raise ValueError(f"duration {text!r} is longer than the {MAX_DURATION.days:,}d allowed")
    return timedelta(seconds=total)


def _time(params: Mapping[str, list[str]], name: str) -> datetime | None:
    value = _one(params, name)
    if value is None:
        return None
    try:
        return parse_rfc3339(value)
    except ValueError:
        raise _HTTPError(
            400, f"{name} must be an RFC 3339 time such as 2026-01-31T12:00:00Z, got {value!r}"
        ) from None


def _one(params: Mapping[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return values[-1] if values else None


def _bool(params: Mapping[str, list[str]], name: str) -> bool | None:
    value = _one(params, name)
    if value is None:
        return None
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise _HTTPError(400, f"{name} must be true, 1, false or 0, got {value!r}")


#: The largest integer parameter (MongoDB stores 64-bit integers; a retry count never gets near).
_MAX_INT = 2**31 - 1


def _int(params: Mapping[str, list[str]], name: str, minimum: int, maximum: int = _MAX_INT) -> int | None:
    value = _one(params, name)
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise _HTTPError(400, f"{name} must be an integer, got {value!r}") from None
    if not minimum <= number <= maximum:
        raise _HTTPError(400, f"{name} must be from {minimum} to {maximum}, got {value[:40]!r}")
    return number


#: The query parameters each route reads; any other is a 400 (a typo must not widen a query).
_FILTER_PARAMS = frozenset(
    {
        "status",
        "min_duration",
        "cursor",
        "event_id",
        "subscription_id",
        "event_name",
        "bus_id",
        "instance_id",
        "has_error",
        "start_time",
        "end_time",
        "min_retries",
        "limit",
        "order_desc",
    }
)
_DELETE_PARAMS = frozenset({"older_than", "force"})


def _known(params: Mapping[str, list[str]], allowed: frozenset[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise _HTTPError(
            400,
            f"unknown query parameter(s) {', '.join(unknown)}; this route takes {', '.join(sorted(allowed)) or 'none'}",
        )


def _filter(params: Mapping[str, list[str]], **fixed: Any) -> MonitorFilter:
    statuses = []
    for value in params.get("status", []):
        for part in value.split(","):
            try:
                statuses.append(MonitorStatus(part.strip().lower()))
            except ValueError:
                raise _HTTPError(
                    400, f"status must be one of {', '.join(s.value for s in MonitorStatus)}, got {part!r}"
                ) from None
    min_duration = _one(params, "min_duration")
    try:
        duration = parse_duration(min_duration) if min_duration is not None else None
    except ValueError as exc:
        raise _HTTPError(400, f"min_duration: {exc}") from None
    cursor = _one(params, "cursor")
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except ConfigurationError as exc:
            raise _HTTPError(400, str(exc)) from None
    values: dict[str, Any] = {
        name: _one(params, name)
        for name in ("event_id", "subscription_id", "event_name", "bus_id", "instance_id")
    }
    values.update(
        statuses=statuses,
        has_error=_bool(params, "has_error"),
        start_time=_time(params, "start_time"),
        end_time=_time(params, "end_time"),
        min_duration=duration,
        min_retries=_int(params, "min_retries", 0),
        cursor=cursor,
        limit=_int(params, "limit", 1, MAX_LIMIT) or 100,
        order_desc=bool(_bool(params, "order_desc")),
    )
    values.update(fixed)
    return MonitorFilter(**values)


def wsgi_app(store: MonitorStore, *, health: Callable[[], Any] | None = None) -> WSGIApp:
    """The monitor HTTP API over ``store``.

    :param store: a :class:`MonitorStore`.
    :param health: serves ``GET /v1/health``: usually ``bus.health`` (anything returning an
        object with ``to_json()`` and ``healthy``, or a dict). 503 when unhealthy.

    Mount it in Flask with ``werkzeug.middleware.dispatcher.DispatcherMiddleware`` or in
    Django with a view that calls it; ``mongo-events monitor serve`` runs it standalone.

    .. versionadded:: 0.1.0
    """

    def route(method: str, path: str, params: Mapping[str, list[str]]) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if parts == ["v1", "health"]:
            _known(params, frozenset())
            if method != "GET":
                raise _HTTPError(405, "method not allowed")
            if health is None:
                raise _HTTPError(404, "no health source configured")
            report = health()
            body = report.to_json() if hasattr(report, "to_json") else dict(report)
            ok = getattr(report, "healthy", body.get("status") != "unhealthy")
            return (200 if ok else 503), body
        if parts[:2] != ["v1", "monitor"]:
            raise _HTTPError(404, f"no route {path}")
        rest = parts[2:]
        if method == "DELETE" and rest == ["entries"]:
            _known(params, _DELETE_PARAMS)
        elif rest in (["summary"], ["entries"], ["entries", "count"]):
            _known(params, _FILTER_PARAMS)
        else:
            _known(params, frozenset())
        if rest == ["summary"]:
            if method != "GET":
                raise _HTTPError(405, "method not allowed")
            return 200, store.summary(_filter(params)).to_json()
        if rest == ["entries"]:
            if method == "GET":
                return 200, store.list(_filter(params)).to_json()
            if method == "DELETE":
                text = _one(params, "older_than") or "24h"
                try:
                    age = parse_duration(text)
                except ValueError as exc:
                    raise _HTTPError(400, f"older_than: {exc}") from None
                if age <= timedelta(0):
                    raise _HTTPError(400, "older_than must be positive")
                if age < timedelta(hours=24) and not _bool(params, "force"):
                    raise _HTTPError(
                        400, "older_than under 24h deletes recent entries: add force=true to confirm"
                    )
                return 200, {"deleted": store.delete_older_than(age)}
            raise _HTTPError(405, "method not allowed")
        if method != "GET":
            raise _HTTPError(405, "method not allowed")
        if rest == ["entries", "count"]:
            return 200, {"count": store.count(_filter(params))}
        if len(rest) == 2 and rest[0] == "entries":
            return 200, {"entries": [e.to_json() for e in store.get_by_event_id(rest[1])]}
        if len(rest) >= 3 and rest[0] == "entries":
            entry = store.get(rest[1], "/".join(rest[2:]))
            if entry is None:
                raise _HTTPError(404, "entry not found")
            return 200, {"entry": entry.to_json()}
        raise _HTTPError(404, f"no route {path}")

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        params = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        try:
            status, body = route(method, environ.get("PATH_INFO", "") or "/", params)
        except _HTTPError as exc:
            status, body = exc.status, {"error": str(exc)}
        except (ConfigurationError, ValueError) as exc:
            status, body = 400, {"error": str(exc)}
        except StoreError as exc:
            log.error("monitor API: %s", exc)
            status, body = 500, {"error": str(exc)}
        except Exception as exc:  # a bug: still JSON, and logged with its traceback
            log.exception("monitor API: %s %s failed", method, environ.get("PATH_INFO"))
            status, body = 500, {"error": f"internal error: {type(exc).__name__}"}
        payload = json.dumps(body, default=str).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        if status == 405:
            headers.append(
                (
                    "Allow",
                    "GET, DELETE" if environ.get("PATH_INFO", "").rstrip("/").endswith("/entries") else "GET",
                )
            )
        start_response(_STATUS_TEXT.get(status, f"{status} Error"), headers)
        return [payload]

    return app
