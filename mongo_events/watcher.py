"""The watcher: one thread that pulls a change stream and hands raw events on.

It never runs user code. It classifies every error the stream raises (one
function, :func:`classify_error`), reopens after resumable ones with
exponential backoff and full jitter, continues after ``invalidate`` with
``startAfter``, and reports what it cannot handle to the bus.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from operator import attrgetter
from typing import Any

import backoff
from pymongo.change_stream import ChangeStream
from pymongo.errors import ConnectionFailure, CursorNotFound, OperationFailure, PyMongoError

from .guard import run_guarded

__all__ = ["ErrorKind", "Position", "Watcher", "classify_error"]

log = logging.getLogger(__name__)


class ErrorKind(enum.Enum):
    """What the watcher does about a change-stream error."""

    RESUMABLE = "resumable"  #: reopen with backoff
    HISTORY_LOST = "history_lost"  #: the resume point is gone: on_history_lost policy
    OVERSIZE = "oversize"  #: an event exceeded 16 MB
    CONFIGURATION = "configuration"  #: fix the deployment or the options; never retried
    FATAL = "fatal"  #: anything else: the bus stops with the error


_HISTORY_LOST = {286, 260}
#: ChangeStreamFatalError: the pipeline modified or removed ``_id`` (the resume token). Not
#: history loss: resetting the token or restarting from now would fail at the next event again.
TOKEN_MODIFIED = 280
_NOT_PRIMARY = {10107, 13435, 13436, 11600, 11602, 189, 91, 6, 7, 89, 9001, 262, 150, 133, 234}
_CONFIGURATION = {
    40573: "change streams need a replica set or a sharded cluster, and this server is standalone: "
    "start mongod with --replSet and run rs.initiate()",
    18: "authentication failed: check the user and password in the connection string",
    13: "the user is not authorised to watch this namespace: grant the changeStream and find actions",
    40324: "the pipeline has a stage a change stream does not allow",
    2: "the server rejected an option or a pipeline stage",
    9: "the server could not parse the change stream's pipeline",
    14: "an option has the wrong type",
    73: "the namespace cannot be watched",
    40602: "the pipeline has a stage a change stream does not allow",
}


def classify_error(exc: BaseException) -> ErrorKind:
    """Classify an exception raised while opening or iterating a change stream."""
    if isinstance(exc, (ConnectionFailure, CursorNotFound)):
        return ErrorKind.RESUMABLE
    if isinstance(exc, OperationFailure):
        code = exc.code
        if code in _HISTORY_LOST:
            return ErrorKind.HISTORY_LOST
        if code == 10334:
            return ErrorKind.OVERSIZE
        if code == TOKEN_MODIFIED:
            return ErrorKind.FATAL
        if exc.has_error_label("ResumableChangeStreamError") or code in _NOT_PRIMARY:
            return ErrorKind.RESUMABLE
        if code in _CONFIGURATION:
            return ErrorKind.CONFIGURATION
    return ErrorKind.FATAL


def explain(exc: BaseException) -> str:
    """A sentence saying what a configuration error means and how to fix it."""
    code = getattr(exc, "code", None)
    hint = _CONFIGURATION.get(code) if isinstance(code, int) else None
    return f"{hint} (server said: {exc})" if hint else str(exc)


class Position:
    """Where the next stream opens: after a token, after an invalidate, at a time, or now."""

    __slots__ = ("resume_after", "start_after", "start_at_operation_time")

    def __init__(
        self,
        resume_after: Mapping[str, Any] | None = None,
        start_after: Mapping[str, Any] | None = None,
        start_at_operation_time: Any = None,
    ) -> None:
        self.resume_after = resume_after
        self.start_after = start_after
        self.start_at_operation_time = start_at_operation_time

    def kwargs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) is not None}

    def __repr__(self) -> str:
        return f"Position({self.kwargs()!r})" if self.kwargs() else "Position(now)"


def pymongo_peek() -> tuple[
    Callable[[ChangeStream[Any]], Mapping[str, Any] | None], Callable[[ChangeStream[Any]], Any]
]:
    """The one deliberate read of pymongo's private state, in one place (tested in test_bus.py).

    Returns two getters for a ``ChangeStream``: its cached resume token
    (``ChangeStream._resume_token``: the public ``resume_token`` property deep-copies on
    every call, a visible share of the per-event cost, and the watcher never mutates
    tokens) and the events pymongo already holds without I/O (``CommandCursor._data``,
    there since pymongo 3). They are ``operator.attrgetter`` objects, run in C: no Python
    frame per event. A pymongo that renames either raises ``AttributeError``; the watcher
    then falls back to the public property, and to handing work on event by event.
    """
    return attrgetter("_resume_token"), attrgetter("_cursor._data")


def _nothing() -> None:
    pass


def _log_fatal(exc: BaseException) -> None:
    log.error("watcher died: %s", exc)


#: While the first stream cannot open, the ERROR line is repeated at most this often (seconds).
ERROR_LOG_INTERVAL = 30.0
#: After ``on_event`` declined an event while the watcher is not stopping (a consumer-group
#: partition whose lease lapsed by the clock, before its member gives it up or renews it late),
#: the watcher waits this long, then reopens *before* that event and offers it again.
DECLINED_PAUSE = 0.05


def reassemble(fragments: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge the fragments of a split event; the last fragment's token resumes after it."""
    merged: dict[str, Any] = {"_id": fragments[-1]["_id"]}
    for fragment in fragments:
        merged.update((k, v) for k, v in fragment.items() if k not in ("_id", "splitEvent"))
    return merged


class Watcher:
    """Pulls one change stream on its own thread.

    :param open_stream: opens a stream at a :class:`Position`.
    :param on_event: receives each raw change document; blocks while the window is full;
        returns ``False`` when it did not take the event (the bus is stopping, or a group
        partition's lease lapsed): the watcher never moves past a declined event.
    :param on_resume_token: receives the stream's resume token when it is a post-batch token.
    :param on_error: decides about an error the watcher cannot resume from: returns the
        :class:`Position` to continue from, or ``None`` to stop.
    :param on_connected: called once, with ``None`` when the first stream opened or the
        error that kept it from opening.
    :param on_opened: called with each newly opened stream before it is read; returns
        ``False`` when the watcher should exit.
    :param on_reconnect: called with the reason (``error``, ``invalidate``, ``history_lost``,
        ``oversize`` ...) and the exception each time the stream is reopened.
    :param on_active: called with ``True`` when a stream starts being read, ``False`` when it closes.
    :param on_drained: called when the events handed to ``on_event`` so far are all the
        stream holds in memory, so the next read may wait on the server (and when reading
        stops): the bus hands its buffered work to the workers then, once per batch.
    """

    def __init__(
        self,
        *,
        name: str,
        open_stream: Callable[[Position], ChangeStream[Any]],
        on_event: Callable[[Mapping[str, Any]], bool],
        on_resume_token: Callable[[Mapping[str, Any] | None], None],
        on_error: Callable[[ErrorKind, BaseException, Position], Position | None],
        on_connected: Callable[[BaseException | None], None],
        on_opened: Callable[[ChangeStream[Any]], bool] | None = None,
        on_reconnect: Callable[[str, BaseException | None], None] | None = None,
        on_active: Callable[[bool], None] | None = None,
        on_drained: Callable[[], None] | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        stop_event: threading.Event,
        min_backoff: float = 0.1,
        max_backoff: float = 30.0,
    ) -> None:
        self.name = name
        self._open = open_stream
        self._on_event = on_event
        self._on_resume_token = on_resume_token
        self._on_error = on_error
        self._on_connected = on_connected
        self._on_opened = on_opened
        self._on_reconnect = on_reconnect
        self._on_active = on_active
        self._on_drained = on_drained or _nothing
        self._on_fatal = on_fatal or _log_fatal
        self._stop = stop_event
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self.position = Position()
        self.active = False
        self._reopen = False
        self._declined = False
        self._thread: threading.Thread | None = None
        self.opened = False  # a stream opened at least once
        self._error_logged_at = -ERROR_LOG_INTERVAL

    def start(self, position: Position) -> None:
        self.position = position
        thread = f"mongo_events.watcher[{self.name}]"
        self._thread = threading.Thread(
            target=run_guarded, args=(self._run, self._on_fatal, thread), name=thread, daemon=True
        )
        self._thread.start()

    def join(self, timeout: float) -> bool:
        if self._thread is None:
            return True
        self._thread.join(max(0.0, timeout))
        return not self._thread.is_alive()

    def _delays(self) -> Iterator[float]:
        gen = backoff.expo(base=2, factor=self._min_backoff, max_value=self._max_backoff)
        gen.send(None)
        for value in gen:
            yield self._min_backoff + backoff.full_jitter(value - self._min_backoff)

    def _run(self) -> None:
        delays = self._delays()
        first = True
        while not self._stop.is_set():
            try:
                stream = self._open(self.position)
            except PyMongoError as exc:
                if not self._recover(exc, delays):
                    return
                continue
            if self._on_opened is not None and not self._on_opened(stream):
                stream.close()
                return
            if stream.resume_token is not None:
                self.position = Position(resume_after=stream.resume_token)
            if first:
                first = False
                self.opened = True
                self._on_connected(None)
            self._set_active(True)
            try:
                with stream:
                    if self._pull(stream):
                        delays = self._delays()
            except PyMongoError as exc:
                self._set_active(False)
                if not self._recover(exc, delays):
                    return
            finally:
                self._set_active(False)
            if self._declined:
                self._declined = False
                self._stop.wait(DECLINED_PAUSE)  # then reopen before the declined event

    def _set_active(self, active: bool) -> None:
        if active == self.active:
            return
        self.active = active
        if self._on_active is not None:
            self._on_active(active)

    def request_reopen(self) -> None:
        """Close the current stream after the event being handed on, and open a new one."""
        self._reopen = True

    def _pull(self, stream: ChangeStream[Any]) -> bool:
        """Iterate until stop, error or invalidate. Returns True once an event arrived."""
        got_any = False
        on_drained = self._on_drained
        on_event = self._on_event
        stopped = self._stop.is_set
        read_token, read_buffered = pymongo_peek()  # hoisted: two C-level getters, no call per event
        fragments: list[Mapping[str, Any]] = []
        self._reopen = False
        # Where to reopen: the newest token, kept in a local and made self.position on the
        # way out (return or exception) rather than once per event.
        resume_after: Mapping[str, Any] | None = None
        try:
            while not stopped():
                raw = stream.try_next()
                try:
                    token = read_token(stream)
                except AttributeError:  # pragma: no cover - a future pymongo
                    token = stream.resume_token
                if raw is None:
                    if not fragments:
                        self._on_resume_token(token)
                        if token is not None:  # reopen here, not "now", if the stream fails while idle
                            resume_after = token
                    if not stream.alive:
                        log.info("change stream %s closed by the server; reopening", self.name)
                        return got_any
                    continue
                got_any = True
                split = raw.get("splitEvent")
                if split is not None:
                    # A large event split by $changeStreamSplitLargeEvent: hand it on whole, once
                    # its last fragment arrived; positions only ever point at whole events.
                    if split.get("fragment") == 1:
                        fragments = []
                    fragments.append(raw)
                    if split.get("fragment") != split.get("of"):
                        continue
                    raw = reassemble(fragments)
                    fragments = []
                if not on_event(raw):
                    # Not taken: any reopen starts before this event, never after it (moving
                    # past it, then noting an idle post-batch token, would checkpoint past it).
                    self._declined = True
                    return got_any
                invalidate = raw.get("operationType") == "invalidate"
                if invalidate:
                    resume_after = None
                    self.position = Position(start_after=raw["_id"])
                elif token is not None:
                    resume_after = token
                if self._reopen:
                    return got_any
                # Events pymongo already holds (handed out without I/O). Without them the
                # stream counts as drained, which only means work is handed on event by event.
                try:
                    more = read_buffered(stream)
                except AttributeError:  # pragma: no cover - a future pymongo
                    more = None
                if not more:
                    on_drained()
                if token is not None and token is not raw["_id"] and token != raw["_id"]:
                    self._on_resume_token(token)  # the last event of a batch: the post-batch token
                if invalidate:
                    log.warning(
                        "change stream %s invalidated (%s); continuing after it with startAfter",
                        self.name,
                        raw.get("_id"),
                    )
                    if self._on_reconnect is not None:
                        self._on_reconnect("invalidate", None)
                    return got_any
            return got_any
        finally:  # on the way out, by return or exception
            if resume_after is not None:
                self.position = Position(resume_after=resume_after)
            on_drained()

    def _recover(self, exc: PyMongoError, delays: Iterator[float]) -> bool:
        """Handle an error; returns False when the watcher should exit."""
        kind = classify_error(exc)
        if kind is ErrorKind.RESUMABLE:
            delay = next(delays)
            now = time.monotonic()
            if not self.opened and now - self._error_logged_at >= ERROR_LOG_INTERVAL:
                # Never connected: nothing is delivered at all. Say so loudly, but not at every retry.
                self._error_logged_at = now
                log.error(
                    "change stream %s cannot open (%r): no change is delivered until it does; retrying at %r in %.2fs",
                    self.name,
                    exc,
                    self.position,
                    delay,
                )
            else:
                log.warning(
                    "change stream %s failed (%r); reopening at %r in %.2fs",
                    self.name,
                    exc,
                    self.position,
                    delay,
                )
            if self._on_reconnect is not None:
                self._on_reconnect("error", exc)
            return not self._stop.wait(delay)
        position = self._on_error(kind, exc, self.position)
        if position is None:
            return False
        self.position = position
        if self._on_reconnect is not None:
            self._on_reconnect(kind.value, exc)
        return True
