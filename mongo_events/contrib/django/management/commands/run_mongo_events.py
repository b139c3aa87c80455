"""``manage.py run_mongo_events``: run the configured buses in the foreground."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Run the buses configured in settings.MONGO_EVENTS until Ctrl-C or SIGTERM (a second one stops at once)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--bus", action="append", dest="buses", help="run only this bus (repeatable)")

    def handle(self, *args: Any, **options: Any) -> None:
        from mongo_events.contrib.django import registry
        from mongo_events.runner import ensure_logging, exit_summary

        ensure_logging()

        conf = dict(getattr(settings, "MONGO_EVENTS", {}) or {})
        if options.get("buses"):
            unknown = set(options["buses"]) - set(registry.names)
            if unknown:
                raise CommandError(
                    f"unknown bus(es) {', '.join(sorted(unknown))}; configured: {', '.join(registry.names)}"
                )
            for name in list(registry.config):
                if name not in options["buses"]:
                    del registry.config[name]
        if not registry.names:
            raise CommandError("no buses configured: set MONGO_EVENTS['BUSES'] in settings")
        from pymongo.errors import PyMongoError

        from mongo_events.errors import MongoEventsError

        def ready() -> None:
            self.stderr.write(f"mongo-events: running {', '.join(registry.started)}; Ctrl-C stops")

        try:
            code = registry.run_forever(float(conf.get("STOP_TIMEOUT", 30)), ready=ready)
        except (MongoEventsError, PyMongoError) as exc:
            registry.stop(5.0)
            raise CommandError(exit_summary(registry.failed, exc)) from exc
        if code:
            failed = registry.failed
            if failed is None:  # a second signal stopped the buses: the status names it, 128 + signal
                raise SystemExit(code)
            raise CommandError(
                exit_summary(failed, failed.error if failed is not None and failed.error else "failed"),
                returncode=code,
            )
