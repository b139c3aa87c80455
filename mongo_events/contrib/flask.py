"""Flask integration: buses from ``app.config``, optional autostart, and ``flask mongo-events run``.

.. code-block:: python

    app.config["MONGO_EVENTS_URI"] = "mongodb://db/?replicaSet=rs0"
    app.config["MONGO_EVENTS_BUSES"] = {"orders": {"database": "shop", "collection": "orders"}}
    events = MongoEvents(app)

    @events.subscribe("orders")
    def on_order(event): ...

Settings: ``MONGO_EVENTS_URI`` (default URI), ``MONGO_EVENTS_BUSES`` (name ->
spec, see :mod:`mongo_events.contrib.registry`), ``MONGO_EVENTS_AUTOSTART``
(default ``False``: run ``flask mongo-events run`` as its own process instead),
``MONGO_EVENTS_STOP_TIMEOUT`` (seconds, default 30).
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable
from typing import Any

from ..bus import Bus
from .registry import BusRegistry

__all__ = ["MongoEvents"]

log = logging.getLogger(__name__)


def _truthy(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes", "on")


def _in_reloader_parent(app: Any) -> bool:
    """Whether this is the parent process of Werkzeug's reloader (which only watches files).

    The reloader's child has ``WERKZEUG_RUN_MAIN=true``. Under ``flask run`` the
    ``--reload/--no-reload`` option decides (its default is the debug flag); elsewhere
    (``app.run(debug=True)``) the reloader is on exactly when debug is.
    """
    if os.environ.get("WERKZEUG_RUN_MAIN") == "true":
        return False
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.info_name == "run" and "reload" in ctx.params:
        reload = ctx.params["reload"]
        return bool(app.debug if reload is None else reload)
    return bool(app.debug)


class MongoEvents:
    """The Flask extension (``MongoEvents(app)`` or ``MongoEvents()`` then ``init_app(app)``).

    With ``MONGO_EVENTS_AUTOSTART`` true, ``init_app`` starts every bus that has
    subscriptions, except in the parent process of Werkzeug's reloader (``flask run
    --debug``, or ``--reload``; ``--no-reload`` starts them in the one process), and
    stops them at interpreter exit. Register subscriptions before ``init_app``
    (or before :meth:`start`).

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
        self._stop_timeout = float(config.get("MONGO_EVENTS_STOP_TIMEOUT", 30.0))
        for bus_name, fn, kwargs in self._subscriptions:
            self.registry.subscribe(bus_name, **kwargs)(fn)
        self._subscriptions.clear()
        app.extensions["mongo_events"] = self
        app.cli.add_command(_cli_group(self))
        if _truthy(config.get("MONGO_EVENTS_AUTOSTART", False)):
            if _in_reloader_parent(app):
                log.info("mongo-events: not starting buses in the reloader's parent process; its child starts them")
                return
            self.start()

    def start(self) -> None:
        """Start every bus that has subscriptions; stopped again at interpreter exit."""
        self.registry.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        self.registry.stop(self._stop_timeout)


def _cli_group(ext: MongoEvents) -> Any:
    import click

    @click.group("mongo-events", help="Run the app's change-stream buses.")
    def group() -> None:
        pass

    @group.command("run", help="Run every configured bus in the foreground until Ctrl-C or SIGTERM.")
    def run() -> None:
        from pymongo.errors import PyMongoError

        from ..errors import MongoEventsError

        def ready() -> None:
            click.echo(f"mongo-events: running {', '.join(ext.registry.names)} in process {os.getpid()}; Ctrl-C stops", err=True)

        try:
            code = ext.registry.run_forever(ext._stop_timeout, ready=ready)
        except (MongoEventsError, PyMongoError) as exc:
            ext.registry.stop(5.0)
            raise click.ClickException(str(exc)) from exc
        raise SystemExit(code)

    return group
