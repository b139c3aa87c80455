"""The monitor's HTTP API and the operator's dashboard, as one WSGI application
(mount it in Flask, Django or any WSGI server).

JSON routes (the seed's, under ``/v1``, and the dashboard's)::

    GET    /v1/monitor/entries                          list (filters, keyset cursor)
    DELETE /v1/monitor/entries?older_than=24h[&force=true]
    GET    /v1/monitor/entries/count
    GET    /v1/monitor/entries/{event_id}
    GET    /v1/monitor/entries/{event_id}/{subscription_id}
    GET    /v1/monitor/summary
    GET    /v1/health[?bus=]                            ``health``, or the published statuses
    GET    /v1/consumers[?bus=]                         the published statuses and the groups
    GET    /v1/dead-letters[/count|/stats|/{id}]
    POST   /v1/dead-letters/{id}/replay, /v1/dead-letters/replay (needs ``replay``)
    DELETE /v1/dead-letters/{id}
    GET    /v1/acks[/count|/{event_id}]
    GET    /v1/csrf                                     a CSRF token for API clients

HTML pages (:mod:`mongo_events.monitor.dashboard`): ``/``, ``/events``,
``/events/{event_id}``, ``/dead-letters``, ``/dead-letters/{id}`` and the
confirmation pages of ``/dead-letters/{id}/replay|delete`` and ``/dead-letters/replay``.

``GET /v1/consumers`` answers ``{"consumers": [...], "groups": [...]}``: every published
:class:`~mongo_events.monitor.ConsumerStatus` (with ``stale``), and per consumer group and
namespace (:func:`~mongo_events.monitor.group_views`)::

    {"group": "billing", "namespace": "shop.orders", "partition_count": 4,
     "members": [{"id": "vm:3342:orders", "bus": "orders", "host": "vm", "pid": 3342,
                  "partitions": [0, 1, 2, 3]}],
     "unheld": [], "contested": [],
     "inactive": [{"id": "vm:3345:orders", "bus": "orders", "host": "vm", "pid": 3345,
                   "state": "running", "stale": true, "heartbeat_at": "2026-..."}]}

``members`` are the live ones only (fresh heartbeat, neither stopped nor failed), with the
partitions each holds; ``inactive`` members hold nothing whatever their last status said;
``unheld`` lists the partitions no live member holds (``null`` when no status gives the
partition count); ``contested``, those two live members claim (statuses written on either
side of a handover).

``GET /v1/health`` from the statuses is per bus the worst status of its live consumers,
leaving out those ``starting`` or ``stopping`` while a ``running`` one does their work (its
group on its namespace, or its checkpoint key), so a rolling restart stays healthy. A bus
with no live consumer, or with a stale or failed one whose work no running consumer does,
is ``unhealthy``; a group with a known partition count some of whose partitions no live
member holds makes it at least ``degraded`` (200: a handover takes a few seconds). The
fleet's (no ``?bus=``) is the worst of its buses. ``error`` says why whenever the status is
``unhealthy`` (503), and names the unheld partitions.

JSON errors are ``{"error": "..."}`` with 400 (bad parameter), 401/403 (auth, CSRF,
read-only), 404, 405 (wrong method), 500 (store failure), 501 (no replay here) or 503
(unhealthy); pages show the same as HTML.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

import attrs

from ..deadletters import DeadLetters
from ..errors import ConfigurationError, StoreError
from ..stores.base import AckStore, DeadLetterStore
from ..stores.records import AckFilter, AckRecord, AckStatus, DeadLetter, DeadLetterFilter
from . import dashboard
from .records import MAX_LIMIT, MonitorFilter, MonitorStatus, decode_cursor, parse_rfc3339, rfc3339
from .status import ConsumerStatus, ConsumerStatusStore, group_views
from .store import MonitorStore

if TYPE_CHECKING:
    from ..bus import Bus

__all__ = ["wsgi_app", "parse_duration"]

log = logging.getLogger(__name__)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_STATUS_TEXT = {
    200: "200 OK",
    303: "303 See Other",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    403: "403 Forbidden",
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


#: The CSRF cookie (double submit: every write sends the same value as a form field
#: ``csrf_token`` or an ``X-CSRF-Token`` header; another site can send neither).
CSRF_COOKIE = "mongo_events_csrf"
_MAX_FORM = 64 * 1024
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_DL_PARAMS = frozenset(
    {
        "event_name",
        "source",
        "error",
        "max_retries",
        "exclude_retried",
        "exclude_quarantined",
        "start",
        "end",
        "limit",
        "offset",
    }
)
_ACK_PARAMS = frozenset({"status", "start", "end", "limit", "offset"})


class _Request:
    def __init__(self, environ: dict[str, Any]) -> None:
        self.environ = environ
        self.method = environ.get("REQUEST_METHOD", "GET").upper()
        self.path = environ.get("PATH_INFO", "") or "/"
        self.base = (environ.get("SCRIPT_NAME") or "").rstrip("/")
        self.params = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        cookies = SimpleCookie()
        try:
            cookies.load(environ.get("HTTP_COOKIE", ""))
        except CookieError:
            pass
        self.cookies = {k: v.value for k, v in cookies.items()}
        self._form: dict[str, list[str]] | None = None

    def form(self) -> Mapping[str, list[str]]:
        if self._form is None:
            self._form = {}
            kind = self.environ.get("CONTENT_TYPE", "")
            if kind.startswith("application/x-www-form-urlencoded"):
                try:
                    length = int(self.environ.get("CONTENT_LENGTH") or 0)
                except ValueError:
                    length = 0
                if length > _MAX_FORM:
                    raise _HTTPError(400, "form too large")
                raw = self.environ["wsgi.input"].read(length) if length > 0 else b""
                self._form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
        return self._form

    def value(self, name: str) -> str:
        return (_one(self.params, name) or "").strip()


class _Response:
    def __init__(
        self, status: int, body: bytes, content_type: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.headers = [("Content-Type", content_type), *(headers or [])]


def _json(status: int, body: Any) -> _Response:
    return _Response(status, json.dumps(body, default=str).encode(), "application/json")


def _letter_json(letter: DeadLetter) -> dict[str, Any]:
    out = attrs.asdict(letter)
    for key, value in out.items():
        if isinstance(value, datetime):
            out[key] = rfc3339(value)
    return out


def _dl_filter(params: Mapping[str, list[str]], **fixed: Any) -> DeadLetterFilter:
    values: dict[str, Any] = {name: _one(params, name) for name in ("event_name", "source", "error")}
    values.update(
        max_retries=_int(params, "max_retries", 0),
        exclude_retried=bool(_bool(params, "exclude_retried")),
        exclude_quarantined=bool(_bool(params, "exclude_quarantined")),
        start=_time(params, "start"),
        end=_time(params, "end"),
        limit=_int(params, "limit", 1, MAX_LIMIT) or 100,
        offset=_int(params, "offset", 0) or 0,
    )
    values.update(fixed)
    return DeadLetterFilter(**values)


def _ack_filter(params: Mapping[str, list[str]]) -> AckFilter:
    status = _one(params, "status")
    try:
        ack_status = AckStatus(status) if status else None
    except ValueError:
        raise _HTTPError(400, f"status must be pending or acked, got {status!r}") from None
    return AckFilter(
        status=ack_status,
        start=_time(params, "start"),
        end=_time(params, "end"),
        limit=_int(params, "limit", 1, MAX_LIMIT) or 100,
        offset=_int(params, "offset", 0) or 0,
    )


def _work(status: ConsumerStatus) -> tuple[str, ...]:
    """What a consumer does, so that another can be said to do it instead: a group member's
    partitions are taken over by any live member of its group on its namespace; a plain
    consumer's work is its checkpoint key (a restarted process resumes it under a new pid)."""
    if status.group:
        return ("group", status.group, status.namespace)
    return ("key", status.checkpoint_key)


def _what(status: ConsumerStatus) -> str:
    """Its work (:func:`_work`) in words."""
    if status.group:
        return f"group {status.group!r} on {status.namespace}"
    return f"checkpoint key {status.checkpoint_key!r}"


def _bus_health(statuses: Sequence[ConsumerStatus], bus: str, now: datetime) -> tuple[str, list[str]]:
    """One bus's status and why it is not healthy, from its published statuses.

    The worst status of its live consumers (:meth:`ConsumerStatus.is_live`), except that a
    ``starting`` or ``stopping`` one does not count while a ``running`` one does its work
    (:func:`_work`): a rolling restart is not an outage. Only ``running`` consumers do a
    work: a consumer that is not live counts only when it did not stop cleanly and no running
    one does its work; then it is ``unhealthy``. A group whose partition count is known is
    done only when its live members hold every partition: otherwise the bus is at least
    ``degraded`` (a handover under way, or a survivor that cannot take the partitions).
    No live consumer at all is ``unhealthy``. Every ``unhealthy`` comes with its reason;
    so does a ``degraded`` from unheld partitions.
    """
    order = {"healthy": 0, "degraded": 1, "unhealthy": 2}
    live = [s for s in statuses if s.is_live(now)]
    if not live:
        newest = max(statuses, key=lambda s: s.heartbeat_at)
        age = (now - newest.heartbeat_at).total_seconds()
        states = ", ".join(sorted({"stale" if s.is_stale(now) else s.state for s in statuses}))
        return "unhealthy", [
            f"no live consumer of bus {bus!r}: the {len(statuses)} that published are {states}; "
            f"the newest heartbeat is {age:.0f}s old (from {newest.host}:{newest.pid})"
        ]
    running = {_work(s) for s in live if s.state == "running"}
    worst, errors = "healthy", []
    for s in live:
        if s.state != "running" and _work(s) in running:
            continue  # starting or stopping next to a running consumer of the same work
        verdict = s.status if s.status in order else "unhealthy"
        worst = max(worst, verdict, key=order.__getitem__)
        if verdict == "unhealthy":
            detail = f" ({s.last_error})" if s.last_error else ""
            if s.state == "running":
                errors.append(f"consumer {s.host}:{s.pid} of bus {bus!r} reports {s.status}{detail}")
            else:
                errors.append(
                    f"consumer {s.host}:{s.pid} of bus {bus!r} is {s.state} and reports {s.status}{detail}, "
                    f"and no running consumer serves its {_what(s)}"
                )
    for view in group_views(statuses, now):
        if view.unheld and view.members:
            worst = max(worst, "degraded", key=order.__getitem__)
            holders = ", ".join(
                f"{s.host}:{s.pid} {s.state} holding [{', '.join(map(str, s.partitions))}]"
                for s in view.members
            )
            errors.append(
                f"group {view.group!r} on {view.namespace} of bus {bus!r}: partitions "
                f"{', '.join(map(str, view.unheld))} of {view.partition_count} are held by no live member "
                f"(live: {holders})"
            )
    for s in statuses:
        if s.is_live(now) or s.state == "stopped" or _work(s) in running:
            continue
        why = "failed" if s.state == "failed" else f"stale (state {s.state})"
        worst = "unhealthy"
        errors.append(
            f"consumer {s.host}:{s.pid} of bus {bus!r} is {why}, heartbeat "
            f"{(now - s.heartbeat_at).total_seconds():.0f}s ago, and no running consumer serves its {_what(s)}"
        )
    return worst, errors


def _health_of(statuses: Sequence[ConsumerStatus], bus: str | None, ttl: float) -> tuple[int, dict[str, Any]]:
    """One bus's (or the fleet's: every bus's, the worst) health from published statuses.

    Only live consumers count (:func:`_bus_health`): the status of a process that was killed
    stays until the TTL removes it, while the others have long taken over its work. A bus
    none of whose consumers is live is ``unhealthy``, with the reason in ``error``.
    """
    now = datetime.now(timezone.utc)
    if not statuses:
        who = f"bus {bus!r}" if bus else "any bus"
        return 503, {
            "status": "unhealthy",
            "bus": bus,
            "error": f"no consumer of {who} published its status in the last {ttl:.0f}s",
            "consumers": [],
        }
    by_bus: dict[str, list[ConsumerStatus]] = {}
    for s in statuses:
        by_bus.setdefault(s.bus, []).append(s)
    order = {"healthy": 0, "degraded": 1, "unhealthy": 2}
    worst, errors = "healthy", []
    for name, found in sorted(by_bus.items()):
        verdict, why = _bus_health(found, name, now)
        worst = max(worst, verdict, key=lambda v: order.get(v, 2))
        errors += why
    body: dict[str, Any] = {"status": worst, "bus": bus}
    if errors:
        body["error"] = "; ".join(errors)
    body["consumers"] = [s.to_json(now) for s in statuses]
    return (503 if worst == "unhealthy" else 200), body


def wsgi_app(
    store: MonitorStore,
    *,
    health: Callable[[], Any] | None = None,
    status: ConsumerStatusStore | None = None,
    dead_letters: DeadLetterStore | None = None,
    acks: AckStore | None = None,
    replay: Bus | DeadLetters | None = None,
    auth: Callable[[dict[str, Any]], bool] | None = None,
    basic_auth: tuple[str, str] | None = None,
    read_only: bool = False,
    csrf_secret: str | bytes | None = None,
) -> WSGIApp:
    """The monitor HTTP API over ``store``, and the dashboard (HTML pages under ``/``).

    :param store: a :class:`MonitorStore` (the Events pages and ``/v1/monitor``).
    :param health: serves ``GET /v1/health``: usually ``bus.health`` (anything returning an
        object with ``to_json()`` and ``healthy``, or a dict). 503 when unhealthy. Without it,
        or with ``?bus=``, the health comes from the published consumer statuses.
    :param status: the :class:`ConsumerStatusStore` buses publish to (``Bus(status=...)``):
        the Overview page, ``GET /v1/consumers`` and ``GET /v1/health``.
    :param dead_letters: the dead-letter store (default: the ``replay`` bus's).
    :param acks: the ack store, for ``GET /v1/acks``.
    :param replay: the :class:`~mongo_events.Bus` (or a configured
        :class:`~mongo_events.DeadLetters`) whose subscriptions replay dead letters; without
        it, replays are refused and the page says where to run ``mongo-events dlq replay``.
    :param auth: ``fn(environ) -> bool``; False answers 403 to every request.
    :param basic_auth: ``("user", "secret")``: HTTP basic authentication on every request.
    :param read_only: hide and refuse (403) every write.
    :param csrf_secret: signs the CSRF tokens (HMAC-SHA256). Default: random, made with the
        app, so tokens are valid only for this app object; give the same secret to every
        worker process serving one dashboard (e.g. gunicorn without ``--preload``, or
        Django's ``SECRET_KEY``).

    Every write (``POST``, ``DELETE``) needs the CSRF token: the ``mongo_events_csrf``
    cookie's value as the ``csrf_token`` form field or the ``X-CSRF-Token`` header
    (``GET /v1/csrf`` hands one out). The token is signed with ``csrf_secret``: a cookie
    the app did not make (planted from a sibling subdomain, say) is refused and replaced. Mount it in Flask with
    ``werkzeug.middleware.dispatcher.DispatcherMiddleware``, in Django with
    :func:`mongo_events.contrib.django.dashboard.dashboard_urls`, or run it under
    gunicorn; ``mongo-events monitor serve`` runs it standalone.

    .. versionadded:: 0.1.0
    """
    manager: DeadLetters | None
    if replay is None or isinstance(replay, DeadLetters):
        manager = replay
    else:
        letters_store = dead_letters or replay.dead_letter_store
        if letters_store is None:
            raise ConfigurationError(
                "replay=bus needs a dead-letter store: pass dead_letters= or give the bus one"
            )
        manager = DeadLetters(letters_store, replay)
    letters = dead_letters if dead_letters is not None else (manager.store if manager is not None else None)
    if basic_auth is not None and (len(basic_auth) != 2 or not all(basic_auth)):
        raise ConfigurationError("basic_auth must be a (user, secret) pair of non-empty strings")

    if csrf_secret is not None and not csrf_secret:
        raise ConfigurationError("csrf_secret must not be empty")
    csrf_key = (
        (csrf_secret.encode() if isinstance(csrf_secret, str) else csrf_secret)
        if csrf_secret is not None
        else secrets.token_bytes(32)
    )

    def csrf_sign(nonce: str) -> str:
        digest = hmac.new(csrf_key, nonce.encode(), hashlib.sha256).digest()[:18]
        return base64.urlsafe_b64encode(digest).decode()

    def csrf_mint() -> str:
        nonce = secrets.token_urlsafe(18)
        return f"{nonce}.{csrf_sign(nonce)}"

    def csrf_genuine(token: str) -> bool:
        """A token this app signed (not merely any cookie value)."""
        nonce, dot, mac = token.partition(".")
        return (
            bool(dot and nonce)
            and len(token) <= 100
            and hmac.compare_digest(csrf_sign(nonce).encode(), mac.encode())
        )

    def need_letters() -> DeadLetterStore:
        if letters is None:
            raise _HTTPError(404, "no dead-letter store configured (wsgi_app(..., dead_letters=store))")
        return letters

    def need_replay() -> DeadLetters:
        if manager is None:
            raise _HTTPError(
                501,
                "this app cannot replay: a dead letter is replayed where its subscription's callback lives; "
                "mount the app there with wsgi_app(..., replay=bus), or run `mongo-events dlq replay --app module:bus` there",
            )
        return manager

    def check_write(req: _Request) -> None:
        if read_only:
            raise _HTTPError(403, "this dashboard is read-only")
        cookie = req.cookies.get(CSRF_COOKIE, "")
        sent = req.environ.get("HTTP_X_CSRF_TOKEN") or _one(req.form(), "csrf_token") or ""
        if not csrf_genuine(cookie) or not hmac.compare_digest(cookie.encode(), sent.encode()):
            raise _HTTPError(
                403,
                f"missing or wrong CSRF token: send the {CSRF_COOKIE} cookie's value as csrf_token or X-CSRF-Token "
                "(GET /v1/csrf gives one)",
            )

    def statuses(bus: str | None = None) -> list[ConsumerStatus]:
        return status.list(bus) if status is not None else []

    # -- JSON API ---------------------------------------------------------------------

    def api(req: _Request) -> _Response:
        method, params = req.method, req.params
        parts = [p for p in req.path.split("/") if p]
        if parts == ["v1", "csrf"]:
            return _json(200, {"token": "", "cookie": CSRF_COOKIE})  # the token is set by app()
        if parts == ["v1", "health"]:
            _known(params, frozenset({"bus"}))
            if method != "GET":
                raise _HTTPError(405, "method not allowed")
            bus = _one(params, "bus")
            if health is not None and bus is None:
                report = health()
                body = report.to_json() if hasattr(report, "to_json") else dict(report)
                ok = getattr(report, "healthy", body.get("status") != "unhealthy")
                return _json(200 if ok else 503, body)
            if status is None:
                raise _HTTPError(404, "no health source configured")
            code, body = _health_of(statuses(bus), bus, status.ttl)
            return _json(code, body)
        if parts == ["v1", "consumers"]:
            _known(params, frozenset({"bus"}))
            if method != "GET":
                raise _HTTPError(405, "method not allowed")
            if status is None:
                raise _HTTPError(404, "no status store configured (wsgi_app(..., status=store))")
            now = datetime.now(timezone.utc)
            found = statuses(_one(params, "bus"))
            return _json(
                200,
                {
                    "consumers": [s.to_json(now) for s in found],
                    "groups": [g.to_json(now) for g in group_views(found, now)],
                },
            )
        if parts[:2] == ["v1", "dead-letters"]:
            return dead_letter_api(req, parts[2:])
        if parts[:2] == ["v1", "acks"]:
            return ack_api(req, parts[2:])
        if parts[:2] != ["v1", "monitor"]:
            raise _HTTPError(404, f"no route {req.path}")
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
            return _json(200, store.summary(_filter(params)).to_json())
        if rest == ["entries"]:
            if method == "GET":
                return _json(200, store.list(_filter(params)).to_json())
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
                check_write(req)
                return _json(200, {"deleted": store.delete_older_than(age)})
            raise _HTTPError(405, "method not allowed")
        if method != "GET":
            raise _HTTPError(405, "method not allowed")
        if rest == ["entries", "count"]:
            return _json(200, {"count": store.count(_filter(params))})
        if len(rest) == 2 and rest[0] == "entries":
            return _json(200, {"entries": [e.to_json() for e in store.get_by_event_id(rest[1])]})
        if len(rest) >= 3 and rest[0] == "entries":
            entry = store.get(rest[1], "/".join(rest[2:]))
            if entry is None:
                raise _HTTPError(404, "entry not found")
            return _json(200, {"entry": entry.to_json()})
        raise _HTTPError(404, f"no route {req.path}")

    def dead_letter_api(req: _Request, rest: list[str]) -> _Response:
        method, params = req.method, req.params
        target = need_letters()
        if rest in ([], ["count"]) and method == "GET":
            _known(params, _DL_PARAMS)
            if rest == ["count"]:
                return _json(200, {"count": target.count(_dl_filter(params))})
            return _json(200, {"dead_letters": [_letter_json(d) for d in target.list(_dl_filter(params))]})
        if rest == ["stats"] and method == "GET":
            _known(params, frozenset())
            stats = target.stats()
            body = attrs.asdict(stats)
            body["oldest"] = rfc3339(stats.oldest) if stats.oldest else None
            body["newest"] = rfc3339(stats.newest) if stats.newest else None
            return _json(200, body)
        if rest == ["replay"] and method == "POST":
            _known(params, _DL_PARAMS)
            manager = need_replay()
            check_write(req)
            result = manager.replay(_dl_filter(params, exclude_retried=True, exclude_quarantined=True))
            return _json(200, attrs.asdict(result))
        if len(rest) == 1 and rest[0] not in ("count", "stats", "replay"):
            _known(params, frozenset())
            if method == "GET":
                letter = target.get(rest[0])
                if letter is None:
                    raise _HTTPError(404, "dead letter not found")
                return _json(200, {"dead_letter": _letter_json(letter)})
            if method == "DELETE":
                check_write(req)
                if not target.delete(rest[0]):
                    raise _HTTPError(404, "dead letter not found")
                return _json(200, {"deleted": rest[0]})
            raise _HTTPError(405, "method not allowed")
        if len(rest) == 2 and rest[1] == "replay":
            _known(params, frozenset())
            if method != "POST":
                raise _HTTPError(405, "method not allowed")
            manager = need_replay()
            check_write(req)
            try:
                outcome = manager.replay_one(rest[0])
            except KeyError:
                raise _HTTPError(404, "dead letter not found") from None
            return _json(200, {"id": rest[0], "outcome": outcome.value})
        if rest in ([], ["count"], ["stats"], ["replay"]):
            raise _HTTPError(405, "method not allowed")
        raise _HTTPError(404, f"no route {req.path}")

    def ack_api(req: _Request, rest: list[str]) -> _Response:
        if acks is None:
            raise _HTTPError(404, "no ack store configured (wsgi_app(..., acks=store))")
        if req.method != "GET":
            raise _HTTPError(405, "method not allowed")
        if rest in ([], ["count"]):
            _known(req.params, _ACK_PARAMS)
            flt = _ack_filter(req.params)
            if rest == ["count"]:
                return _json(200, {"count": acks.count(flt), "pending": acks.pending_count()})
            return _json(200, {"acks": [_ack_json(a) for a in acks.list(flt)]})
        if len(rest) == 1:
            _known(req.params, frozenset())
            record = acks.get(rest[0])
            if record is None:
                raise _HTTPError(404, "ack record not found")
            return _json(200, {"ack": _ack_json(record)})
        raise _HTTPError(404, f"no route {req.path}")

    # -- HTML pages -----------------------------------------------------------------------

    def html_page(req: _Request, csrf: str) -> _Response:
        parts = [p for p in req.path.split("/") if p]
        base = req.base
        if req.method not in ("GET", "HEAD", "POST"):
            raise _HTTPError(405, "method not allowed")
        writing = req.method == "POST"
        if parts == []:
            status_error = None
            try:
                found = statuses()
            except StoreError as exc:
                found, status_error = [], str(exc)
            summary = store.summary(MonitorFilter(start_time=datetime.now(timezone.utc) - timedelta(days=1)))
            stats = letters.stats() if letters is not None else None
            return _html(200, dashboard.overview(base, found, summary, stats, status_error=status_error))
        if parts == ["events"]:
            shown = {
                k: req.value(k)
                for k in ("status", "subscription_id", "start_time", "end_time", "min_duration", "cursor")
            }
            query = {k: [v] for k, v in shown.items() if v}
            entries = store.list(_filter(query, order_desc=True, limit=50))
            return _html(200, dashboard.events(base, entries, shown))
        if len(parts) == 2 and parts[0] == "events":
            return _html(200, dashboard.event(base, parts[1], store.get_by_event_id(parts[1])))
        if parts[:1] != ["dead-letters"]:
            raise _HTTPError(404, f"no page {req.path}")
        target = need_letters()
        can_write, can_replay = not read_only, manager is not None
        if parts == ["dead-letters"]:
            shown = {k: req.value(k) for k in ("error", "event_name", "include_replayed", "done")}
            include = shown["include_replayed"] == "1"
            flt = DeadLetterFilter(
                error=shown["error"] or None,
                event_name=shown["event_name"] or None,
                exclude_retried=not include,
                exclude_quarantined=not include,
            )
            result = None
            if shown["done"] == "bulk":
                counts = {
                    k: _int(req.params, k, 0) or 0 for k in ("replayed", "failed", "quarantined", "skipped")
                }
                result = ", ".join(f"{v:,} {k}" for k, v in counts.items())
            return _html(
                200,
                dashboard.dead_letters(
                    base,
                    target.list(flt),
                    target.count(attrs.evolve(flt, limit=100)),
                    shown,
                    can_write=can_write,
                    can_replay=can_replay,
                    done=shown["done"] or None,
                    result=result,
                ),
            )
        if parts == ["dead-letters", "replay"]:  # bulk replay of a filter
            need_replay()
            source = req.form() if writing else req.params
            flt = DeadLetterFilter(
                error=_one(source, "error") or None,
                event_name=_one(source, "event_name") or None,
                exclude_retried=True,
                exclude_quarantined=True,
                limit=MAX_LIMIT,
            )
            if not writing:
                if read_only:
                    raise _HTTPError(403, "this dashboard is read-only")
                what = f"Replay the {target.count(flt):,} dead letters waiting that match"
                what += f" error ~ {flt.error!r}" if flt.error else ""
                what += f", subscription {flt.event_name!r}" if flt.event_name else ""
                hidden = {k: v for k, v in (("error", flt.error), ("event_name", flt.event_name)) if v}
                return _html(
                    200, dashboard.confirm(base, "replay", "/dead-letters/replay", what + "?", csrf, hidden)
                )
            check_write(req)
            counts = attrs.asdict(need_replay().replay(flt))
            return _redirect(req, "/dead-letters", {"done": "bulk", **{k: str(v) for k, v in counts.items()}})
        if len(parts) < 2:
            raise _HTTPError(404, f"no page {req.path}")
        letter_id = parts[1]
        if len(parts) == 2:
            letter = target.get(letter_id)
            if letter is None:
                raise _HTTPError(404, "dead letter not found")
            return _html(200, dashboard.dead_letter(base, letter))
        if len(parts) == 3 and parts[2] in ("replay", "delete"):
            action = parts[2]
            if action == "replay":
                need_replay()
            if not writing:
                if read_only:
                    raise _HTTPError(403, "this dashboard is read-only")
                letter = target.get(letter_id)
                if letter is None:
                    raise _HTTPError(404, "dead letter not found")
                what = (
                    f"{action.capitalize()} the dead letter {letter.id} of subscription {letter.event_name} "
                    f"({letter.error[:200]})?"
                )
                return _html(
                    200,
                    dashboard.confirm(
                        base, action, f"/dead-letters/{quote(letter_id, safe='')}/{action}", what, csrf
                    ),
                )
            check_write(req)
            if action == "delete":
                if not target.delete(letter_id):
                    raise _HTTPError(404, "dead letter not found")
                return _redirect(req, "/dead-letters", {"done": "deleted"})
            try:
                outcome = need_replay().replay_one(letter_id)
            except KeyError:
                raise _HTTPError(404, "dead letter not found") from None
            return _redirect(req, "/dead-letters", {"done": outcome.value})
        raise _HTTPError(404, f"no page {req.path}")

    def _redirect(req: _Request, path: str, params: Mapping[str, str]) -> _Response:
        return _Response(303, b"", "text/plain", [("Location", f"{req.base}{path}?{urlencode(params)}")])

    def authorized(environ: dict[str, Any]) -> _Response | None:
        if basic_auth is not None:
            header = environ.get("HTTP_AUTHORIZATION", "")
            ok = False
            if header[:6].lower() == "basic ":
                try:
                    user, _, secret = (
                        base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
                    )
                except (binascii.Error, UnicodeDecodeError):
                    user = secret = ""
                ok = hmac.compare_digest(user.encode(), basic_auth[0].encode()) & hmac.compare_digest(
                    secret.encode(), basic_auth[1].encode()
                )
            if not ok:
                response = _json(401, {"error": "authentication required"})
                response.headers.append(("WWW-Authenticate", 'Basic realm="mongo-events", charset="UTF-8"'))
                return response
        if auth is not None and not auth(environ):
            return _json(403, {"error": "forbidden"})
        return None

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        req = _Request(environ)
        is_api = req.path.startswith("/v1/") or req.path == "/v1"
        csrf = req.cookies.get(CSRF_COOKIE, "")
        new_cookie = not csrf_genuine(csrf)
        if new_cookie:
            csrf = csrf_mint()
        try:
            response = authorized(environ)
            if response is None:
                response = api(req) if is_api else html_page(req, csrf)
        except _HTTPError as exc:
            response = _error(is_api, req, exc.status, str(exc))
        except (ConfigurationError, ValueError) as exc:
            response = _error(is_api, req, 400, str(exc))
        except StoreError as exc:
            log.error("monitor API: %s", exc)
            response = _error(is_api, req, 500, str(exc))
        except Exception as exc:  # a bug: still an answer, and logged with its traceback
            log.exception("monitor API: %s %s failed", req.method, req.path)
            response = _error(is_api, req, 500, f"internal error: {type(exc).__name__}")
        headers = list(response.headers)
        if req.path.rstrip("/") == "/v1/csrf" and response.status == 200:
            response = _json(200, {"token": csrf, "cookie": CSRF_COOKIE})
            headers = list(response.headers)
        if (
            response.status in (200, 303)
            and new_cookie
            and (not is_api or req.path.rstrip("/") == "/v1/csrf")
        ):
            secure = "; Secure" if environ.get("wsgi.url_scheme") == "https" else ""
            headers.append(
                (
                    "Set-Cookie",
                    f"{CSRF_COOKIE}={csrf}; Path={req.base or '/'}; HttpOnly; SameSite=Strict{secure}",
                )
            )
        if response.status == 405:
            allow = "GET"
            if req.path.rstrip("/").endswith("/entries"):
                allow = "GET, DELETE"
            headers.append(("Allow", allow))
        if not is_api:
            headers += [
                ("Content-Security-Policy", _CSP),
                ("X-Content-Type-Options", "nosniff"),
                ("X-Frame-Options", "DENY"),
                ("Referrer-Policy", "same-origin"),
                ("Cache-Control", "no-store"),
            ]
        headers.append(("Content-Length", str(len(response.body))))
        start_response(_STATUS_TEXT.get(response.status, f"{response.status} Error"), headers)
        return [b"" if req.method == "HEAD" else response.body]

    return app


def _ack_json(record: AckRecord) -> dict[str, Any]:
    return {
        "event_id": record.event_id,
        "created_at": rfc3339(record.created_at),
        "acked_at": rfc3339(record.acked_at) if record.acked_at else None,
        "status": record.status.value,
    }


def _html(status: int, text: str) -> _Response:
    return _Response(status, text.encode(), "text/html; charset=utf-8")


def _error(is_api: bool, req: _Request, status: int, text: str) -> _Response:
    if is_api:
        response = _json(status, {"error": text})
    else:
        response = _html(
            status, dashboard.message(req.base, _STATUS_TEXT.get(status, str(status))[4:], text, status)
        )
    if status == 401:
        response.headers.append(("WWW-Authenticate", 'Basic realm="mongo-events", charset="UTF-8"'))
    return response
