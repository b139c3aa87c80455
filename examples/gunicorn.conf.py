"""gunicorn: start buses in each worker after the fork (only if they must live in the web process).

    gunicorn -c examples/gunicorn.conf.py yourapp:app

Buses in the workers: put them in a consumer group (``MONGO_EVENTS_GROUP = "web"`` in
Flask, ``"GROUP"`` in Django's ``MONGO_EVENTS``, or ``Bus(..., group="web")``), so that
each change is handled by one worker, and a worker that dies hands its share to the
others within ``lease_ttl``. Without a group every worker handles every change. A
separate watcher process (``flask mongo-events run``, ``manage.py run_mongo_events``)
works too.
"""

from __future__ import annotations

from typing import Any

workers = 2
preload_app = True  # fine: buses are created or started only in post_fork
# A worker's buses stop within MONGO_EVENTS_STOP_TIMEOUT (30 s by default): keep gunicorn's
# graceful_timeout above it, or gunicorn kills the worker before the final checkpoint is written.
graceful_timeout = 40


def post_fork(server: Any, worker: Any) -> None:
    # Set up the OpenTelemetry SDK here too: providers and their threads are per process.
    from yourapp import events  # type: ignore[import-not-found]  # your MongoEvents() or a module holding buses

    events.start()


def worker_exit(server: Any, worker: Any) -> None:
    from yourapp import events  # type: ignore[import-not-found]

    events.stop()


if __name__ == "__main__":
    print("a gunicorn configuration: gunicorn -c examples/gunicorn.conf.py yourapp:app")
