"""Flask integration: buses from ``app.config``, callbacks in the app context, ``flask mongo-events run``.

.. code-block:: python

    app.config["MONGO_EVENTS_URI"] = "mongodb://db/?replicaSet=rs0"
    app.config["MONGO_EVENTS_BUSES"] = {"orders": {"database": "shop", "collection": "orders"}}
    events = MongoEvents(app)

    @events.subscribe("orders")
    def on_order(event): ...

Settings: ``MONGO_EVENTS_URI`` (default URI), ``MONGO_EVENTS_BUSES`` (name ->
spec, see :mod:`mongo_events.contrib.registry`), ``MONGO_EVENTS_AUTOSTART``
(default ``False``: run ``flask mongo-events run`` as its own process instead;
``True``: a process starts the buses when it serves its first request),
``MONGO_EVENTS_STOP_TIMEOUT`` (seconds, default 30), ``MONGO_EVENTS_GROUP`` (the consumer
group of every bus whose spec names none: with it, every web worker may start its buses and
each change is handled by one of them; see ``Bus(group=...)``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from ..bus import Bus
from ..delivery import Delivery
from ..middleware.base import Middleware
from ..runner import ensure_logging, exit_summary
from .registry import BusRegistry

__all__ = ["MongoEvents", "AppContext"]

log = logging.getLogger(__name__)


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes", "on")


class AppContext(Middleware):
    """Runs each callback inside ``app.app_context()``, so ``current_app``, ``g``,
    Flask-SQLAlchemy sessions and other extensions work in callbacks (the context is
    torn down after each attempt, as after a request).

    :class:`MongoEvents` installs it on every bus it builds.

    .. versionadded:: 0.1.0
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._local = threading.local()

    def before_delivery(self, delivery: Delivery) -> None:
        self._pop()  # a context left by an attempt that never reached after_delivery
        ctx = self.app.app_context()
        ctx.push()
        self._local.ctx = ctx

    def after_delivery(self, delivery: Delivery, error: BaseException | None, duration: float) -> None:
        self._pop(error)

    def _pop(self, error: BaseException | None = None) -> None:
        ctx = getattr(self._local, "ctx", None)
        if ctx is not None:
            self._local.ctx = None
            ctx.pop(error)


class MongoEvents:
    """The Flask extension (``MongoEvents(app)`` or ``MongoEvents()`` then ``init_app(app)``).

    Every bus built here runs its callbacks inside the app context (:class:`AppContext`).
    With ``MONGO_EVENTS_AUTOSTART`` true, a process starts every bus that has
    subscriptions when it serves its first request, so subscriptions registered after
    ``MongoEvents(app)`` are included, and processes that never serve (Werkzeug's
    reloader parent, a ``gunicorn --preload`` master, ``flask shell``, other
    commands) never start them. The buses stop at interpreter exit.
    Call :meth:`start` yourself to start them at another moment.

    .. versionadded:: 0.1.0
    """

    def __init__(self, app: Any = None) -> None:
        self.registry = BusRegistry()
        self._subscriptions: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []
        self._stop_timeout = 30.0
        if app is not None:
            self.init_app(app)

    def subscribe(self, bus_name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """``@events.subscribe("orders", payload=Order)``: takes ``Bus.subscribe``'s options."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            if self.registry.config or bus_name in self.registry.names:
                self.registry.subscribe(bus_name, **kwargs)(fn)
            else:  # init_app not called yet: keep it until the configuration is known
                self._subscriptions.append((bus_name, fn, kwargs))
            return fn

        return register

    def bus(self, name: str) -> Bus:
        """The bus called ``name`` (built on first use in this process)."""
        return self.registry.bus(name)

    def init_app(self, app: Any) -> None:
        config = app.config
        self.registry.config.update(config.get("MONGO_EVENTS_BUSES") or {})
        self.registry.uri = config.get("MONGO_EVENTS_URI") or self.registry.uri
        self.registry.group = config.get("MONGO_EVENTS_GROUP") or self.registry.group
        self.registry.middleware.append(AppContext(app))
        self._stop_timeout = float(config.get("MONGO_EVENTS_STOP_TIMEOUT", 30.0))
        self.registry.stop_timeout = self._stop_timeout
        for bus_name, fn, kwargs in self._subscriptions:
            self.registry.subscribe(bus_name, **kwargs)(fn)
        self._subscriptions.clear()
        app.extensions["mongo_events"] = self
        app.cli.add_command(_cli_group(self))
        if _truthy(config.get("MONGO_EVENTS_AUTOSTART", False)):
            app.before_request(self._start_on_first_request)

    def _start_on_first_request(self) -> None:
        self.registry.autostart()  # once per process; after a failed start, again later

    def start(self) -> None:
        """Start every bus that has subscriptions; stopped again at interpreter exit."""
        self.registry.start()

    def stop(self) -> None:
        self.registry.stop(self._stop_timeout)


def _cli_group(ext: MongoEvents) -> Any:
    import click

    @click.group("mongo-events", help="Run the app's change-stream buses.")
    def group() -> None:
        pass

    @group.command(
        "run", help="Run every configured bus in the foreground until Ctrl-C or SIGTERM (twice: at once)."
    )
    def run() -> None:
        from pymongo.errors import PyMongoError

        from ..errors import MongoEventsError

        ensure_logging()
        registry = ext.registry

        def ready() -> None:
            click.echo(
                f"mongo-events: running {', '.join(registry.started)} in process {os.getpid()}; Ctrl-C stops",
                err=True,
            )

        try:
            code = registry.run_forever(ext._stop_timeout, ready=ready)
        except (MongoEventsError, PyMongoError) as exc:
            registry.stop(5.0)
            click.echo(exit_summary(registry.failed, exc), err=True)
            raise SystemExit(1) from exc
        if code and registry.failed is not None:
            click.echo(exit_summary(registry.failed, registry.failed.error or "failed"), err=True)
        raise SystemExit(code)

    return group
