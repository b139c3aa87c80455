"""The Django app config: reads ``MONGO_EVENTS``, finds ``events`` modules, optionally autostarts."""

from __future__ import annotations

import logging
from typing import Any

from django.apps import AppConfig

log = logging.getLogger(__name__)


class MongoEventsConfig(AppConfig):
    name = "mongo_events.contrib.django"
    label = "mongo_events"
    verbose_name = "mongo-events"

    def ready(self) -> None:
        from django.conf import settings
        from django.core.signals import request_started
        from django.utils.module_loading import autodiscover_modules

        from . import configure, registry

        conf = configure(settings)
        autodiscover_modules("events")
        configure(settings)  # subscriptions made while importing events modules
        registry.stop_timeout = float(conf.get("STOP_TIMEOUT", 30))
        if conf.get("AUTOSTART"):
            # Only a process that serves requests starts the buses: runserver's child (or
            # --noreload), gunicorn/uWSGI workers, ASGI servers. Management commands
            # (check, migrate, shell, ...) and a gunicorn --preload master never serve one.
            request_started.connect(_start_on_first_request, dispatch_uid="mongo_events_autostart")


def _start_on_first_request(sender: Any = None, **kwargs: Any) -> None:
    from . import registry

    registry.autostart()  # once per process; after a failed start, again later
