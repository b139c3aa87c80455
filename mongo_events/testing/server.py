"""The fake replica set: a test double that speaks the MongoDB wire protocol.

This is **not a database**. It answers a real :class:`pymongo.MongoClient` as a
one-node replica set primary, keeps data in mongomock, and implements change
streams over its own oplog. Faults come two ways: MongoDB's own
``configureFailPoint``/``failCommand`` test command (see ``failpoints.py``),
which the same tests can use against a real server, and fake-only calls for
what no fail point expresses (step down, oplog loss).

Run it as a process with ``python -m mongo_events.testing.server --port N``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .backend import Backend
from .errors import CommandError, code_name, server_labels
from .wire import Request, encode_reply, read_request

__all__ = ["FakeReplicaSet", "main"]

log = logging.getLogger(__name__)

#: Commands that keep working while the fake is stepped down.
_ALWAYS_SERVED = {
    "hello",
    "ismaster",
    "isMaster",
    "ping",
    "buildInfo",
    "buildinfo",
    "endSessions",
    "killCursors",
    "mongoEventsFake",
    "configureFailPoint",
    "waitForFailPoint",
    "getParameter",
    "getCmdLineOpts",
    "serverStatus",
}
#: MongoDB's limit on a document, and so on a change event (16 MiB).
MAX_BSON_SIZE = 16 * 1024 * 1024
_CANONICAL = {
    "ismaster": "hello",
    "isMaster": "hello",
    "findandmodify": "findAndModify",
    "buildinfo": "buildInfo",
}


@dataclass
class _Fault:
    kind: str  # "error" | "drop" | "delay"
    remaining: int
    code: int = 0
    message: str = ""
    labels: tuple[str, ...] = ()
    seconds: float = 0.0


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: FakeReplicaSet) -> None:
        self.owner = owner
        super().__init__(address, _Connection)


class _Connection(socketserver.BaseRequestHandler):
    server: _Server
    #: The application name the client's handshake gave (``failCommand``'s ``appName``).
    app_name: str | None = None

    def handle(self) -> None:
        owner = self.server.owner
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        owner._track(sock, add=True)
        try:
            while True:
                try:
                    request = read_request(sock)
                except (OSError, ValueError):
                    return
                if request is None:
                    return
                reply = owner._serve(request, self)
                if reply is None:  # fault: drop the connection without answering
                    return
                if request.more_to_come:
                    continue
                try:
                    sock.sendall(encode_reply(request, reply))
                except OSError:
                    return
        finally:
            owner._track(sock, add=False)
            try:
                sock.close()
            except OSError:
                pass


class FakeReplicaSet:
    """A one-node replica set test double on 127.0.0.1.

    :param port: TCP port; ``0`` picks a free one.
    :param data_dir: directory for a journal that makes data and oplog survive a restart.
    :param oplog_size: number of oplog entries kept; older resume points answer 286.
    :param standalone: answer as a standalone server (change streams then fail with 40573).
    :param max_event_size: change events larger than this many bytes fail with 10334
        ``BSONObjectTooLarge`` unless the stream splits them with
        ``$changeStreamSplitLargeEvent`` (default 16 MiB, as on a real server; ``None``: no check).
    :param supports_split: ``False`` rejects ``$changeStreamSplitLargeEvent`` as an older server would.
    :param test_commands: answer ``configureFailPoint`` (the ``failCommand`` fail point), as a
        server started with ``--setParameter enableTestCommands=1`` does (default ``True``).

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        port: int = 0,
        *,
        data_dir: str | None = None,
        oplog_size: int = 100_000,
        standalone: bool = False,
        set_name: str = "rs0",
        max_event_size: int | None = MAX_BSON_SIZE,
        supports_split: bool = True,
        test_commands: bool = True,
    ) -> None:
        self._requested_port = port
        self._test_commands = test_commands
        self._data_dir = data_dir
        self._oplog_size = oplog_size
        self._standalone = standalone
        self._set_name = set_name
        self._max_event_size = max_event_size
        self._supports_split = supports_split
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._faults: dict[str, list[_Fault]] = defaultdict(list)
        self._faults_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self.backend: Backend | None = None
        self.port = port

    # -- lifecycle --------------------------------------------------------

    def start(self) -> FakeReplicaSet:
        """Bind, load the journal if any, and serve in a daemon thread."""
        server = _Server(("127.0.0.1", self._requested_port), self)
        self.port = server.server_address[1]
        self.backend = Backend(
            "127.0.0.1",
            self.port,
            oplog_size=self._oplog_size,
            data_dir=self._data_dir,
            standalone=self._standalone,
            set_name=self._set_name,
            max_event_size=self._max_event_size,
            supports_split=self._supports_split,
            test_commands=self._test_commands,
        )
        self.backend.connection_count = lambda: len(self._connections)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"mongo_events.fake_rs[{self.port}]",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every client connection (clients see a network error).

        Bounded: the accept loop stops first (within its 50 ms poll), then waiting
        getMores wake and every connection closes, so no handler thread holds it up.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        if self.backend is not None:
            self.backend.close()
        with self._faults_lock:
            conns = list(self._connections)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        if self._thread is not None:
            self._thread.join(1)

    def __enter__(self) -> FakeReplicaSet:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def uri(self) -> str:
        """A connection string for pymongo (with ``replicaSet=`` unless standalone)."""
        if self._standalone:
            return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"
        return f"mongodb://127.0.0.1:{self.port}/?replicaSet={self._set_name}"

    # -- fault injection ---------------------------------------------------

    def fail(
        self,
        command: str,
        *,
        code: int,
        message: str = "injected failure",
        labels: tuple[str, ...] | list[str] = (),
        times: int = 1,
    ) -> None:
        """Answer the next ``times`` ``command`` requests with an error."""
        self._add(command, _Fault("error", times, code=code, message=message, labels=tuple(labels)))

    def drop_connection(self, command: str, *, times: int = 1) -> None:
        """Close the connection, without a reply, on the next ``times`` ``command`` requests."""
        self._add(command, _Fault("drop", times))

    def delay(self, command: str, seconds: float, *, times: int = 1) -> None:
        """Delay the reply to the next ``times`` ``command`` requests."""
        self._add(command, _Fault("delay", times, seconds=seconds))

    def step_down(self, seconds: float) -> None:
        """Act as a secondary for ``seconds``: writes and change streams answer NotWritablePrimary."""
        assert self.backend is not None
        self.backend.step_down_until = time.monotonic() + seconds

    def clear_faults(self) -> None:
        with self._faults_lock:
            self._faults.clear()

    def command_count(self, name: str) -> int:
        """How many ``name`` commands arrived since start (or :meth:`reset_counters`)."""
        assert self.backend is not None
        return self.backend.counters[name]

    @property
    def counters(self) -> dict[str, int]:
        assert self.backend is not None
        return dict(self.backend.counters)

    def reset_counters(self) -> None:
        assert self.backend is not None
        self.backend.counters.clear()

    def _add(self, command: str, fault: _Fault) -> None:
        with self._faults_lock:
            self._faults[_CANONICAL.get(command, command)].append(fault)

    def _take_fault(self, name: str) -> _Fault | None:
        with self._faults_lock:
            queue = self._faults.get(name)
            if not queue:
                return None
            fault = queue[0]
            fault.remaining -= 1
            if fault.remaining <= 0:
                queue.pop(0)
            return fault

    # -- serving -------------------------------------------------------------

    def _track(self, sock: socket.socket, *, add: bool) -> None:
        with self._faults_lock:
            (self._connections.add if add else self._connections.discard)(sock)

    def _serve(self, request: Request, conn: _Connection) -> dict[str, Any] | None:
        backend = self.backend
        assert backend is not None
        body = request.body
        raw_name = next(iter(body))
        name = _CANONICAL.get(raw_name, raw_name)
        if name == "mongoEventsFake":
            return self._control(body)
        if name == "hello" and isinstance(body.get("client"), dict):
            conn.app_name = (body["client"].get("application") or {}).get("name")
        fault = self._take_fault(name)
        if fault is not None:
            backend.counters[name] += 1
            if fault.kind == "drop":
                return None
            if fault.kind == "delay":
                time.sleep(fault.seconds)
            elif fault.kind == "error":
                return CommandError(
                    fault.code, code_name(fault.code), fault.message, list(fault.labels)
                ).to_reply()
        action = backend.fail_points.check(name, conn.app_name) if backend.test_commands else None
        if action is not None:
            if action.block_seconds > 0:
                time.sleep(action.block_seconds)
            if action.close_connection:
                backend.counters[name] += 1
                return None
            if action.error_code is not None:
                backend.counters[name] += 1
                labels = (
                    action.error_labels
                    if action.error_labels is not None
                    else server_labels(name, body, action.error_code)
                )
                message = f"Failing command {name} via 'failCommand' failpoint"
                return backend.finish(
                    CommandError(action.error_code, code_name(action.error_code), message, labels).to_reply()
                )
        if raw_name not in _ALWAYS_SERVED and time.monotonic() < backend.step_down_until:
            backend.counters[name] += 1
            labels = (
                ["ResumableChangeStreamError"]
                if name in ("aggregate", "getMore")
                else ["RetryableWriteError"]
            )
            return CommandError(10107, "NotWritablePrimary", "not primary", labels).to_reply()
        reply = backend.handle(body)
        if action is not None and action.write_concern_error is not None:
            wce = action.write_concern_error
            reply["writeConcernError"] = wce
            labels = (
                action.error_labels
                if action.error_labels is not None
                else server_labels(name, body, None, wce.get("code"))
            )
            if labels:
                reply["errorLabels"] = labels
        return reply

    def _control(self, body: dict[str, Any]) -> dict[str, Any]:
        """``{mongoEventsFake: 1, fail|drop|delay|stepDown|resetCounters: ...}`` for a server in another process."""
        if "fail" in body:
            spec = body["fail"]
            self.fail(
                spec["command"],
                code=spec["code"],
                message=spec.get("message", "injected failure"),
                labels=spec.get("labels", []),
                times=spec.get("times", 1),
            )
        if "drop" in body:
            self.drop_connection(body["drop"]["command"], times=body["drop"].get("times", 1))
        if "delay" in body:
            self.delay(
                body["delay"]["command"], body["delay"]["seconds"], times=body["delay"].get("times", 1)
            )
        if "stepDown" in body:
            self.step_down(float(body["stepDown"]))
        if body.get("resetCounters"):
            self.reset_counters()
        return {"ok": 1.0, "counters": self.counters}


def main(argv: list[str] | None = None) -> int:
    """Run a fake replica set in the foreground until SIGINT or SIGTERM; exit within a second of it."""
    parser = argparse.ArgumentParser(
        prog="python -m mongo_events.testing.server",
        description="Run the mongo-events fake replica set (a test double, not a database).",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--data-dir", help="keep data and oplog here so they survive a restart")
    parser.add_argument("--oplog-size", type=int, default=100_000, help="oplog entries kept (default 100000)")
    parser.add_argument("--standalone", action="store_true", help="answer as a standalone server")
    parser.add_argument(
        "--max-event-size",
        type=int,
        default=MAX_BSON_SIZE,
        help=f"change events above this many bytes fail with 10334 unless split (default {MAX_BSON_SIZE}; 0: no limit)",
    )
    parser.add_argument(
        "--disable-test-commands",
        action="store_true",
        help="refuse configureFailPoint, as a server without enableTestCommands does",
    )
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    rs = FakeReplicaSet(
        args.port,
        data_dir=args.data_dir,
        oplog_size=args.oplog_size,
        standalone=args.standalone,
        max_event_size=args.max_event_size or None,
        test_commands=not args.disable_test_commands,
    ).start()
    print(rs.uri, flush=True)
    while not stop.wait(0.1):
        pass
    # Whatever a connection thread is doing (a blocked fail point, a long getMore), the
    # process ends within a second of the signal: a watchdog ends it if stopping or the
    # interpreter's shutdown is held up.
    watchdog = threading.Timer(_EXIT_WITHIN, _exit_now)
    watchdog.daemon = True
    watchdog.start()
    rs.stop()
    return 0


#: Seconds after SIGINT/SIGTERM by which ``main`` has ended the process.
_EXIT_WITHIN = 0.8


def _exit_now() -> None:
    log.warning("the fake replica set did not stop within %.1f s of the signal; exiting anyway", _EXIT_WITHIN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
