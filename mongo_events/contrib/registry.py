"""Buses built from configuration, shared by the Flask and Django integrations.

A configuration maps bus names to specs::

    {
        "orders": {
            "uri": "mongodb://db1,db2/?replicaSet=rs0",   # default: the registry's uri
            "database": "shop",
            "collection": "orders",                       # omit: database watch; omit both: cluster
            "full_document": "updateLookup",
            "resume_token_id": "web",
            "start_from_past": 3600,                      # seconds, or a timedelta
            ...                                           # any other Bus option
        },
    }

Buses are built lazily, in the process that first asks for one: never build
clients or buses before a server forks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import pymongo

from ..bus import FINAL_FLUSH_MIN, Bus
from ..errors import ConfigurationError, MongoEventsError
from ..runner import exit_summary

__all__ = ["HURRY_MARGIN", "BusRegistry", "build_bus"]

log = logging.getLogger(__name__)

_TARGET_KEYS = ("uri", "database", "collection", "client_options")

#: Seconds a second signal's stop may take beyond ``FINAL_FLUSH_MIN`` per bus (closing the
#: clients, a loaded machine) before :meth:`BusRegistry.run_forever` exits the process at once.
HURRY_MARGIN = 2.0


def build_bus(
    name: str, spec: Mapping[str, Any], default_uri: str | None = None
) -> tuple[Bus, pymongo.MongoClient[Any]]:
    """Build one bus (and its client) from a spec; see the module docstring.

    :raises ConfigurationError: when the spec is incomplete or names an unknown option.
    """
    uri = spec.get("uri") or default_uri
    if not uri:
        raise ConfigurationError(
            f"bus {name!r} has no MongoDB URI: set its 'uri' or the integration's URI setting"
        )
    if "collection" in spec and "database" not in spec:
        raise ConfigurationError(f"bus {name!r} names a collection but no 'database'")
    options = {k: v for k, v in spec.items() if k not in _TARGET_KEYS}
    if isinstance(options.get("start_from_past"), (int, float)):
        options["start_from_past"] = timedelta(seconds=options["start_from_past"])
    options.setdefault("name", name)
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(uri, **dict(spec.get("client_options") or {}))
    target: Any = client
    if "database" in spec:
        target = client[spec["database"]]
        if "collection" in spec:
            target = target[spec["collection"]]
    try:
        bus = Bus(target, **options)
    except TypeError as exc:
        client.close()
        raise ConfigurationError(f"bus {name!r}: {exc}; see the Bus options in README.rst") from exc
    except BaseException:
        client.close()
        raise
    return bus, client


class BusRegistry:
    """Named buses from a configuration, their subscriptions, and their lifecycle.

    :param config: bus name -> spec (see :func:`build_bus`).
    :param uri: the default MongoDB URI for specs without one.
    :param middleware: extra middleware given to every bus built here.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        config: Mapping[str, Mapping[str, Any]] | None = None,
        uri: str | None = None,
        middleware: list[Any] | None = None,
    ) -> None:
        self.config: dict[str, Mapping[str, Any]] = dict(config or {})
        self.uri = uri
        self.middleware = list(middleware or [])
        self._buses: dict[str, Bus] = {}
        self._clients: list[pymongo.MongoClient[Any]] = []
        self._pending: dict[str, list[tuple[Callable[..., Any], dict[str, Any]]]] = {}
        self._lock = threading.RLock()
        self._stop_at_exit = False
        #: Seconds :meth:`stop` at interpreter exit waits for running callbacks.
        self.stop_timeout = 30.0
        #: The bus that made :meth:`run_forever` (or :meth:`start`) end, if one did.
        self.failed: Bus | None = None
        #: Seconds after a failed :meth:`autostart` before a request tries again.
        self.autostart_retry = 30.0
        self._autostart_next = 0.0  # monotonic time of the next autostart; inf once started
        #: The consumer group of every configured bus whose spec names none (``Bus(group=...)``):
        #: every web worker can then start its buses, and each change is handled once.
        self.group: str | None = None

    def autostart(self) -> None:
        """Start the buses at a request of a web process: the first one, and after a failed
        start, the first one at least :attr:`autostart_retry` seconds later.

        Never raises (the request is served): a failure is logged at ERROR with what to do.
        A configuration error is not retried, since it fails the same way every time.
        """
        with self._lock:
            if time.monotonic() < self._autostart_next:
                return
            self._autostart_next = math.inf
            self.failed = None
        try:
            self.start()
        except ConfigurationError as exc:
            log.error(
                "%s; this process (%d) consumes no events until it restarts",
                exit_summary(self.failed, exc),
                os.getpid(),
            )
        except Exception as exc:
            with self._lock:
                self._autostart_next = time.monotonic() + self.autostart_retry
            log.error(
                "%s; this process (%d) consumes no events now and tries again at a request in %gs or later",
                exit_summary(self.failed, exc),
                os.getpid(),
                self.autostart_retry,
            )

    def add_bus(self, name: str, bus: Bus) -> None:
        """Register a bus built in code (its subscriptions made with :meth:`subscribe` are applied)."""
        with self._lock:
            if name in self._buses:
                raise ConfigurationError(f"a bus named {name!r} is already registered")
            self._buses[name] = bus
            for fn, kwargs in self._pending.pop(name, []):
                bus.subscribe(**kwargs)(fn)

    def subscribe(self, bus_name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """``@registry.subscribe("orders", payload=Order)``: a callback for a named bus.

        Takes ``Bus.subscribe``'s options; applied when the bus is built.
        """

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            with self._lock:
                bus = self._buses.get(bus_name)
                if bus is not None:
                    bus.subscribe(**kwargs)(fn)
                else:
                    if bus_name not in self.config:
                        raise ConfigurationError(
                            f"no bus named {bus_name!r} is configured (known: {', '.join(sorted(self.config)) or 'none'})"
                        )
                    self._pending.setdefault(bus_name, []).append((fn, kwargs))
            return fn

        return register

    @property
    def names(self) -> list[str]:
        with self._lock:
            return sorted(set(self.config) | set(self._buses))

    @property
    def started(self) -> list[str]:
        """The names of the buses built here that started (starting, running or stopping)."""
        with self._lock:
            buses = dict(self._buses)
        return sorted(n for n, b in buses.items() if b.state.value not in ("new", "stopped"))

    def bus(self, name: str) -> Bus:
        """The bus called ``name``, built on first use in this process."""
        with self._lock:
            bus = self._buses.get(name)
            if bus is not None:
                return bus
            if name not in self.config:
                raise ConfigurationError(
                    f"no bus named {name!r} is configured (known: {', '.join(self.names) or 'none'})"
                )
            spec = dict(self.config[name])
            if self.group is not None:
                spec.setdefault("group", self.group)
            if self.middleware:
                spec["middleware"] = [*self.middleware, *spec.get("middleware", [])]
            bus, client = build_bus(name, spec, self.uri)
            self._clients.append(client)
            self._buses[name] = bus
            for fn, kwargs in self._pending.pop(name, []):
                bus.subscribe(**kwargs)(fn)
            return bus

    def start(self) -> None:
        """Build and start every bus that has subscriptions; each is stopped again at interpreter exit.

        A configured bus without subscriptions is logged as an ERROR naming it (it would
        consume nothing) and not started. :attr:`failed` names the bus whose start raised.
        """
        for name in self.names:
            bus = self.bus(name)
            if not bus.subscriptions:
                log.error(
                    "mongo-events: bus %r has no subscriptions, so it is not started: subscribe before it starts",
                    name,
                )
                continue
            if bus.state.value in ("new", "stopped", "failed"):
                try:
                    bus.start()
                except BaseException:
                    self.failed = bus
                    raise
                log.info("mongo-events: started bus %s in process %d", name, os.getpid())
        with self._lock:
            if not self._stop_at_exit:
                self._stop_at_exit = True
                _at_exit(self._stop_at_exit_hook)

    def _stop_at_exit_hook(self) -> None:
        self.stop(self.stop_timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every running bus and close the clients built here."""
        with self._lock:
            buses = list(self._buses.values())
            clients, self._clients = self._clients, []
        for bus in buses:
            if bus.state.value == "new":  # never started (Bus.stop would wait for a start)
                continue
            try:
                bus.stop(timeout)
            except MongoEventsError as exc:
                log.error("mongo-events: stopping bus %s: %s", bus.name, exc)
        for client in clients:
            client.close()

    def run_forever(self, stop_timeout: float = 30.0, ready: Callable[[], None] | None = None) -> int:
        """Start every bus and block until SIGINT/SIGTERM or one fails; returns an exit code.

        The first signal stops gracefully (running callbacks get ``stop_timeout`` seconds).
        A second one stops every bus at once, as in ``Bus.run_forever()``: no more waiting
        for callbacks, one checkpoint write per bus bounded to ``FINAL_FLUSH_MIN`` seconds,
        and the result is 128 + the signal number; events not finished are delivered again
        after restart. Should that stop not end within ``FINAL_FLUSH_MIN`` per bus plus
        :data:`HURRY_MARGIN`, the process exits at once with that status (a WARNING says
        what was still stopping). When a bus fails, :attr:`failed` is that bus and the
        result is 1.

        :raises ConfigurationError: no configured bus has subscriptions (typically the
            module that subscribes was not imported), so nothing started.

        :param ready: called once every bus with subscriptions has started (to announce :attr:`started`).
        """
        stop = threading.Event()
        stopped = threading.Event()  # the stop after the signals ended: the watchdog stands down
        previous: dict[signal.Signals, Any] = {}
        signals: list[int] = []
        helpers: list[threading.Thread] = []  # what the handler started: joined before returning

        def on_signal(signum: int, frame: Any) -> None:
            # Runs in the main thread, maybe inside the graceful stop (or a log write) it
            # interrupts: it only sets events and starts threads, which log for it (logging
            # here could fail with "reentrant call" on the stream being written).
            signals.append(signum)
            stop.set()
            if len(signals) == 1:
                helper = threading.Thread(
                    target=log.warning,
                    args=(
                        "mongo-events: got signal %d; stopping gracefully (within %gs; a second signal stops at once)",
                        signum,
                        stop_timeout,
                    ),
                    name="mongo_events.signal-log",
                    daemon=True,
                )
            elif len(signals) == 2:
                helper = threading.Thread(
                    target=_watch_hurried_stop,
                    args=(signum, self._hurry(), stopped),
                    name="mongo_events.registry-stop-watch",
                    daemon=True,
                )
            else:
                return  # the hurried stop is under way, bounded by its watchdog
            helper.start()
            helpers.append(helper)

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        try:
            self.failed = None
            self.start()
            if not self.started:
                raise ConfigurationError(
                    f"no bus has subscriptions, nothing to run (configured: {', '.join(self.names) or 'none'}); "
                    "is the module with the @subscribe functions imported in this process?"
                )
            if ready is not None:
                ready()
            log.info("mongo-events: running %s in process %d", ", ".join(self.started), os.getpid())
            failed = None
            while not stop.wait(0.2):
                failed = next((b for b in self._buses.values() if b.error is not None), None)
                if failed is not None:
                    break
            if len(signals) > 1:
                self._hurry()  # again: a start under way at the second signal made new runs
            self.stop(stop_timeout)
            if failed is not None:
                self.failed = failed
                log.error("mongo-events: bus %s failed: %s", failed.name, failed.error)
            if len(signals) > 1:
                return 128 + signals[1]
            return 1 if failed is not None else 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            stopped.set()
            # Their lines come before the caller's exit, and the watchdog stands down.
            deadline = time.monotonic() + FINAL_FLUSH_MIN
            for helper in list(helpers):
                helper.join(max(0.0, deadline - time.monotonic()))

    def _hurry(self) -> list[Bus]:
        """Make every bus's stop, under way or next, stop at once (see ``Bus.hurry()``); returns them."""
        buses = list(self._buses.values())  # no lock: this runs in a signal handler
        for bus in buses:
            bus.hurry()
        return buses


def _watch_hurried_stop(signum: int, buses: list[Bus], stopped: threading.Event) -> None:
    """After a second signal: wait for the hurried stop within its bound, else exit the process now."""
    bound = FINAL_FLUSH_MIN * max(1, len(buses)) + HURRY_MARGIN
    # Saying so must not keep the bound from holding: a logging handler or filter that
    # raises would otherwise end this thread, and nothing would exit the process.
    with contextlib.suppress(Exception):
        log.warning(
            "mongo-events: second signal %d: stopping every bus now: no more waiting for callbacks, one "
            "checkpoint write each (within %.1fs, else the process exits at once); unfinished events "
            "are delivered again after restart",
            signum,
            bound,
        )
    if stopped.wait(bound):
        return
    try:
        stopping = [b.name for b in buses if b.state.value not in ("new", "stopped", "failed")]
        log.warning(
            "mongo-events: the stop after the second signal did not end within %.1fs (%s); exiting now with "
            "status %d: events after each bus's last stored checkpoint are delivered again after restart",
            bound,
            f"still stopping: {', '.join(stopping)}"
            if stopping
            else "the buses stopped; closing their clients did not end",
            128 + signum,
        )
    finally:  # the bound holds even if saying why failed
        os._exit(128 + signum)


def _at_exit(fn: Callable[[], None]) -> None:
    """Run ``fn`` at interpreter exit *before* the dispatcher's exit hook warns about running buses.

    ``atexit`` hooks run after ``threading``'s, too late: the dispatcher would already have
    warned that the interpreter exits while the bus runs. Hooks registered with
    ``threading._register_atexit`` run in reverse order, so this one runs first.
    """
    register = getattr(threading, "_register_atexit", None)
    if register is None:  # pragma: no cover - CPython has had it since 3.9
        import atexit

        atexit.register(fn)
        return
    try:
        register(fn)
    except RuntimeError:  # the interpreter is already shutting down
        pass
