"""gunicorn with 2 workers, each starting its buses after the fork with a group: each change handled once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pymongo
import pytest

from ..conftest import CLIENT_OPTIONS, wait_for
from ..crash.harness import ROOT, _start_server

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gunicorn is POSIX only")

APP = """
import os

import flask

from mongo_events.contrib.flask import MongoEvents

app = flask.Flask(__name__)
app.config.update(
    MONGO_EVENTS_URI=os.environ["MONGO_URI"],
    MONGO_EVENTS_GROUP="web",
    MONGO_EVENTS_BUSES={
        "orders": {
            "database": "shop",
            "collection": "orders",
            "partitions": 2,
            "lease_ttl": 2.0,
            "max_await_time": 0.05,
            "flush_interval": 0.05,
        }
    },
    MONGO_EVENTS_STOP_TIMEOUT=5,
)
events = MongoEvents(app)


@events.subscribe("orders")
def on_order(event):
    fd = os.open(os.environ["HANDLED_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {event.document_key['_id']}\\n".encode())
    finally:
        os.close(fd)


@app.route("/")
def index():
    return "ok"
"""

CONF = """
workers = 2
graceful_timeout = 15


def post_fork(server, worker):
    from app import events

    events.start()


def worker_exit(server, worker):
    from app import events

    events.stop()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_gunicorn_workers_in_one_group_handle_each_change_once(tmp_path: Path) -> None:
    import gunicorn.config

    server, uri = _start_server(str(tmp_path / "data"))
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(uri, **CLIENT_OPTIONS)
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "gconf.py").write_text(textwrap.dedent(CONF))
    handled = tmp_path / "handled.log"
    quiet = (
        ["--no-control-socket"]
        if any(s.name == "control_socket_disable" for s in gunicorn.config.KNOWN_SETTINGS)
        else []
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT]),
        "MONGO_URI": uri,
        "HANDLED_LOG": str(handled),
    }
    err = open(tmp_path / "gunicorn.err", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gconf.py",
            "--bind",
            f"127.0.0.1:{_free_port()}",
            *quiet,
            "app:app",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    err.close()
    leases = client.shop["_event_leases"]

    def owners() -> set[int]:
        return {
            doc["owner"]["pid"]
            for doc in leases.find({"_id": {"$regex": "^web:shop.orders#"}, "owner": {"$ne": None}})
        }

    def log() -> str:
        return (tmp_path / "gunicorn.err").read_text()[-4000:]

    try:
        # Given both workers started their bus, and each holds one of the two partitions
        assert wait_for(lambda: len(owners()) == 2, timeout=30), log()
        assert proc.pid not in owners()  # the master never runs a bus
        # When 40 changes are written
        for i in range(40):
            client.shop.orders.insert_one({"_id": i})

        def lines() -> list[tuple[str, str]]:
            text = handled.read_text() if handled.exists() else ""
            return [tuple(line.split()) for line in text.splitlines()]  # type: ignore[misc]

        assert wait_for(lambda: len({d for _, d in lines()}) == 40, timeout=20), log()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log()
        # Then each was handled once, by one worker or the other
        counts = Counter(d for _, d in lines())
        assert counts == Counter({str(i): 1 for i in range(40)}), log()
        assert len({pid for pid, _ in lines()}) == 2, log()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        client.close()
        server.terminate()
        server.wait(10)
