"""The Django app config: reads ``MONGO_EVENTS``, finds ``events`` modules, optionally autostarts."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from django.apps import AppConfig

from ...runner import exit_summary

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


_started = False
_lock = threading.Lock()


def _start_on_first_request(sender: Any = None, **kwargs: Any) -> None:
    global _started
    with _lock:  # once per process: the first request starts the buses
        if _started:
            return
        _started = True
    from . import registry

    try:
        registry.start()
    except Exception as exc:  # the request is served; the buses' failure is said loudly
        log.error(
            "%s; this process (%d) consumes no events until it restarts",
            exit_summary(registry.failed, exc),
            os.getpid(),
        )
