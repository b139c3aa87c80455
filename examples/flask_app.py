"""Flask: buses from app.config, the monitor API mounted at /monitor, a view that writes orders.

In production set MONGO_EVENTS_AUTOSTART = False and run the watcher as its own
process with ``flask --app examples.flask_app mongo-events run`` (see README:
one watcher process per deployment). This script drives the app with Flask's
test client so it runs anywhere::

    python examples/flask_app.py
"""

from __future__ import annotations

import threading
from typing import Any

import flask
import pymongo
import pymongo.collection
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import mongo_events as me
from mongo_events.contrib.flask import MongoEvents
from mongo_events.demo import demo_uri
from mongo_events.monitor import MemoryMonitorStore, wsgi_app

events = MongoEvents()
monitor = MemoryMonitorStore()
handled = threading.Semaphore(0)


@events.subscribe("orders", name="confirm")
def confirm(event: me.ChangeEvent) -> None:
    print(f"confirming order {event.document_id}", flush=True)
    handled.release()


def create_app(uri: str) -> flask.Flask:
    app = flask.Flask(__name__)
    app.config.update(
        MONGO_EVENTS_URI=uri,
        MONGO_EVENTS_BUSES={
            "orders": {
                "database": "shop",
                "collection": "orders",
                "resume_token_id": "flask-example",
                "monitor": monitor,
            }
        },
        MONGO_EVENTS_AUTOSTART=False,
    )
    events.init_app(app)
    orders: pymongo.collection.Collection[Any] = pymongo.MongoClient(uri)["shop"]["orders"]

    @app.post("/orders")
    def create_order() -> Any:
        result = orders.insert_one(dict(flask.request.get_json()))
        return {"id": str(result.inserted_id)}, 201

    app.wsgi_app = DispatcherMiddleware(
        app.wsgi_app, {"/monitor": wsgi_app(monitor, health=events.bus("orders").health)}
    )  # type: ignore[method-assign]
    return app


def main() -> int:
    with demo_uri() as uri:
        app = create_app(uri)
        events.start()  # what MONGO_EVENTS_AUTOSTART=True does at init_app
        try:
            web = app.test_client()
            assert web.post("/orders", json={"_id": 1, "item": "book"}).status_code == 201
            ok = handled.acquire(timeout=30)
            events.bus("orders").join(10)
            events.bus("orders").flush()
            print("monitor:", web.get("/monitor/v1/monitor/entries/count").get_json(), flush=True)
            print("health:", web.get("/monitor/v1/health").get_json()["status"], flush=True)
        finally:
            events.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
