"""Django: settings-driven buses, ``manage.py run_mongo_events``, connection hygiene around callbacks.

A real project puts ``"mongo_events.contrib.django"`` in INSTALLED_APPS, the
MONGO_EVENTS setting in settings.py and subscriptions in an app's events.py,
then runs ``python manage.py run_mongo_events`` as its own process. This file
does the same in one script::

    python examples/django_project.py
"""

from __future__ import annotations

import os
import signal
import threading

import pymongo

import mongo_events as me
from mongo_events.demo import demo_uri


def main() -> int:
    import django
    from django.conf import settings
    from django.core.management import call_command

    from mongo_events.contrib.django import get_bus, subscribe

    handled = threading.Event()

    @subscribe("orders")  # in a project: <app>/events.py, found at startup
    def on_order(event: me.ChangeEvent) -> None:
        print(f"django handled {event.operation_type} of order {event.document_id}", flush=True)
        handled.set()

    with demo_uri() as uri:
        settings.configure(
            INSTALLED_APPS=["mongo_events.contrib.django"],
            DATABASES={},
            MONGO_EVENTS={
                "URI": uri,
                "BUSES": {
                    "orders": {
                        "database": "shop",
                        "collection": "orders",
                        "resume_token_id": "django-example",
                    }
                },
            },
        )
        django.setup()

        def write_then_stop() -> None:
            bus = get_bus("orders")
            while bus.state is not me.BusState.RUNNING and not handled.wait(0.05):
                pass
            with pymongo.MongoClient(uri) as client:
                client["shop"]["orders"].insert_one({"_id": 1, "item": "book"})
            handled.wait(30)
            os.kill(os.getpid(), signal.SIGTERM)  # what Ctrl-C or a process manager does

        threading.Thread(target=write_then_stop, daemon=True).start()
        call_command("run_mongo_events")
    return 0 if handled.is_set() else 1


if __name__ == "__main__":
    raise SystemExit(main())
