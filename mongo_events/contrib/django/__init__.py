"""Django integration: settings-driven buses, ``manage.py run_mongo_events``, connection hygiene.

Add ``"mongo_events.contrib.django"`` to ``INSTALLED_APPS`` and configure::

    MONGO_EVENTS = {
        "URI": "mongodb://db/?replicaSet=rs0",
        "BUSES": {"orders": {"database": "shop", "collection": "orders"}},
        "AUTOSTART": False,      # True: start in every web process (see README: usually not)
        "STOP_TIMEOUT": 30,
        "GROUP": "web",          # optional: every bus joins this consumer group (Bus(group=...)),
    }                            # so every web process may start them: each change is handled once

Subscribe in an ``events.py`` module of any installed app (found at startup)::

    from mongo_events.contrib.django import subscribe

    @subscribe("orders")
    def on_order(event): ...

Every bus built here runs :class:`CloseOldConnections` around each callback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...bus import Bus
from ...delivery import Delivery
from ...middleware.base import Middleware
from ..registry import BusRegistry

__all__ = ["subscribe", "get_bus", "registry", "CloseOldConnections"]

default_app_config = "mongo_events.contrib.django.apps.MongoEventsConfig"


class CloseOldConnections(Middleware):
    """Closes Django database connections that are broken or past ``CONN_MAX_AGE``
    before and after each callback, as Django does around each request.

    .. versionadded:: 0.1.0
    """

    def before_delivery(self, delivery: Delivery) -> None:
        from django.db import close_old_connections

        close_old_connections()

    def after_delivery(self, delivery: Delivery, error: BaseException | None, duration: float) -> None:
        from django.db import close_old_connections

        close_old_connections()


#: The process's buses, configured from ``settings.MONGO_EVENTS`` when the app is ready.
registry = BusRegistry(middleware=[CloseOldConnections()])


def subscribe(bus_name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``@subscribe("orders", payload=Order)``: a callback for a bus named in the settings."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if bus_name in registry.names:
            registry.subscribe(bus_name, **kwargs)(fn)
        else:  # settings not read yet (an events module imported early)
            _early.append((bus_name, fn, kwargs))
        return fn

    return register


_early: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []


def get_bus(name: str) -> Bus:
    """The bus called ``name``, built on first use in this process."""
    return registry.bus(name)


def configure(settings: Any) -> dict[str, Any]:
    """Load ``settings.MONGO_EVENTS`` into the registry (called by the app config)."""
    conf = dict(getattr(settings, "MONGO_EVENTS", {}) or {})
    registry.config.update(conf.get("BUSES") or {})
    registry.uri = conf.get("URI") or registry.uri
    registry.group = conf.get("GROUP") or registry.group  # the consumer group of every bus (Bus(group=))
    while _early:
        bus_name, fn, kwargs = _early.pop(0)
        registry.subscribe(bus_name, **kwargs)(fn)
    return conf
