"""The Django app config: reads ``MONGO_EVENTS``, finds ``events`` modules, optionally autostarts."""

from __future__ import annotations

import atexit
import logging
import os
import sys

from django.apps import AppConfig

log = logging.getLogger(__name__)


class MongoEventsConfig(AppConfig):
    name = "mongo_events.contrib.django"
    label = "mongo_events"
    verbose_name = "mongo-events"

    def ready(self) -> None:
        from django.conf import settings
        from django.utils.module_loading import autodiscover_modules

        from . import configure, registry

        conf = configure(settings)
        autodiscover_modules("events")
        configure(settings)  # subscriptions made while importing events modules
        if not conf.get("AUTOSTART"):
            return
        if "runserver" in sys.argv and os.environ.get("RUN_MAIN") != "true":
            log.info("mongo-events: not starting buses in the autoreloader's parent process")
            return
        if any(cmd in sys.argv for cmd in ("run_mongo_events", "migrate", "makemigrations", "shell", "test", "collectstatic")):
            return
        registry.start()
        timeout = float(conf.get("STOP_TIMEOUT", 30))
        atexit.register(registry.stop, timeout)
