"""Flask and Django integration, fork safety and the uWSGI check."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from typing import Any

import flask
import pymongo
import pytest

import mongo_events as me
from mongo_events.contrib import BusRegistry
from mongo_events.contrib.flask import MongoEvents
from mongo_events.testing import FakeReplicaSet

from .conftest import CLIENT_OPTIONS
from .helpers import FAST, Recorder, stop_gracefully
from .test_examples import ROOT


def flask_app(uri: str, **config: Any) -> flask.Flask:
    app = flask.Flask("contrib_test")
    app.config.update(
        MONGO_EVENTS_URI=uri,
        MONGO_EVENTS_BUSES={
            "orders": {"database": "shop", "collection": "orders", "resume_token_id": "web", **FAST}
        },
        MONGO_EVENTS_STOP_TIMEOUT=5,
        **config,
    )
    return app


def test_flask_autostart_starts_at_the_first_request_with_later_subscriptions_in_the_app_context(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any]
) -> None:
    # Given the order README.rst shows: MongoEvents(app) first, subscriptions after it.
    app = flask_app(fake_rs.uri, MONGO_EVENTS_AUTOSTART=True, GREETING="hello")
    app.add_url_rule("/", "index", lambda: "ok")
    events = MongoEvents(app)
    seen = Recorder()

    @events.subscribe("orders")
    def on_order(ev: me.ChangeEvent) -> None:
        seen.add((ev.document_id, flask.current_app.config["GREETING"], flask.current_app.name))

    bus = events.bus("orders")
    try:
        # A process that never serves a request (a gunicorn --preload master, the reloader's
        # parent, `flask shell`) never starts the buses.
        assert bus.state is me.BusState.NEW
        assert app.test_client().get("/").status_code == 200
        assert bus.state is me.BusState.RUNNING and bus.resume_token_key == "shop.orders:web"
        assert app.extensions["mongo_events"] is events
        app.test_client().get("/")  # later requests change nothing
        client.shop.orders.insert_one({"_id": 7})
        assert seen.wait(1) == [(7, "hello", "contrib_test")]
    finally:
        events.stop()
    assert bus.state is me.BusState.STOPPED


def test_flask_does_not_autostart_by_default(fake_rs: FakeReplicaSet) -> None:
    app = flask_app(fake_rs.uri)
    app.add_url_rule("/", "index", lambda: "ok")
    events = MongoEvents(app)
    events.subscribe("orders")(lambda ev: None)
    assert app.test_client().get("/").status_code == 200
    assert events.bus("orders").state is me.BusState.NEW


def test_flask_autostart_says_which_bus_has_no_subscriptions(
    fake_rs: FakeReplicaSet, caplog: pytest.LogCaptureFixture
) -> None:
    app = flask_app(fake_rs.uri, MONGO_EVENTS_AUTOSTART="true")
    app.add_url_rule("/", "index", lambda: "ok")
    events = MongoEvents(app)
    with caplog.at_level("ERROR", logger="mongo_events"):
        assert app.test_client().get("/").status_code == 200
    try:
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert any("bus 'orders' has no subscriptions" in m for m in errors), errors
        assert events.bus("orders").state is me.BusState.NEW
    finally:
        events.stop()


def test_flask_autostart_tries_again_after_a_failed_start(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # A malformed checkpoint fails the start; once an operator fixes it, a later request starts
    # the bus without restarting the web process.
    tokens = client.shop["_event_resume_tokens"]
    tokens.insert_one({"_id": "shop.orders:web", "token": {}})
    app = flask_app(fake_rs.uri, MONGO_EVENTS_AUTOSTART=True)
    app.add_url_rule("/", "index", lambda: "ok")
    events = MongoEvents(app)
    events.registry.autostart_retry = 0.0
    seen = Recorder()
    events.subscribe("orders")(lambda ev: seen.add(ev.document_id))
    bus = events.bus("orders")
    try:
        with caplog.at_level("ERROR", logger="mongo_events"):
            assert app.test_client().get("/").status_code == 200
        assert bus.state is me.BusState.FAILED
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert any("tries again at a request" in m and "shop.orders:web" in m for m in errors), errors
        tokens.delete_one({"_id": "shop.orders:web"})
        assert app.test_client().get("/").status_code == 200
        assert bus.state is me.BusState.RUNNING
        client.shop.orders.insert_one({"_id": 8})
        assert seen.wait(1) == [8]
    finally:
        events.stop()


def test_unknown_bus_names_say_which_exist(fake_rs: FakeReplicaSet) -> None:
    events = MongoEvents(flask_app(fake_rs.uri))
    with pytest.raises(me.ConfigurationError, match="known: orders"):
        events.subscribe("nope")(lambda ev: None)
    with pytest.raises(me.ConfigurationError, match="no MongoDB URI"):
        BusRegistry({"x": {"database": "d"}}).bus("x")
    with pytest.raises(me.ConfigurationError, match="unexpected keyword"):
        BusRegistry({"x": {"database": "d", "colour": "red"}}, uri=fake_rs.uri).bus("x")


def test_flask_cli_runs_buses_in_the_foreground(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], tmp_path: Any
) -> None:
    (tmp_path / "flaskapp.py").write_text(
        "import flask\nfrom mongo_events.contrib.flask import MongoEvents\n"
        "app = flask.Flask(__name__)\n"
        f"app.config['MONGO_EVENTS_URI'] = {fake_rs.uri!r}\n"
        "app.config['MONGO_EVENTS_BUSES'] = {'orders': {'database': 'shop', 'collection': 'orders', 'max_await_time': 0.05}}\n"
        "events = MongoEvents(app)\n"
        "@events.subscribe('orders')\n"
        "def on(ev):\n    print('got', ev.document_id, flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "flaskapp", "mongo-events", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:
            if "running orders" in line:
                break
        client.shop.orders.insert_one({"_id": 42})
        assert proc.stdout.readline().strip() == "got 42"
        assert stop_gracefully(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- Django ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def django_rs() -> Iterator[FakeReplicaSet]:
    import django
    from django.conf import settings

    with FakeReplicaSet() as rs:
        settings.configure(
            INSTALLED_APPS=["mongo_events.contrib.django"],
            DATABASES={},
            MONGO_EVENTS={
                "URI": rs.uri,
                "BUSES": {"orders": {"database": "shop", "collection": "orders", **FAST}},
                "STOP_TIMEOUT": 5,
            },
        )
        django.setup()
        yield rs


def test_django_command_runs_buses_with_connection_hygiene(
    django_rs: FakeReplicaSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    import django.db
    from django.core.management import call_command

    from mongo_events.contrib.django import get_bus, subscribe

    closed = []
    monkeypatch.setattr(django.db, "close_old_connections", lambda: closed.append(1))
    got = threading.Event()

    @subscribe("orders")
    def on_order(ev: me.ChangeEvent) -> None:
        got.set()

    def drive() -> None:
        bus = get_bus("orders")
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(django_rs.uri, **CLIENT_OPTIONS)
        while bus.state is not me.BusState.RUNNING and not got.wait(0.05):
            pass
        client.shop.orders.insert_one({"_id": 1})
        got.wait(10)
        client.close()
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=drive)
    thread.start()
    call_command("run_mongo_events")
    thread.join()
    assert got.is_set()
    assert len(closed) >= 2  # before and after the callback
    assert get_bus("orders").state is me.BusState.STOPPED


def test_django_command_rejects_unknown_buses(django_rs: FakeReplicaSet) -> None:
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError, match="unknown bus"):
        call_command("run_mongo_events", bus=["nope"])


# -- fork safety ------------------------------------------------------------------------------------


def _in_child(fn: Any) -> int:
    """Run ``fn`` in a forked child; returns its exit status (fn's return value, 99 on exception)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads: fine for this test
        pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            code = fn()
        except BaseException:
            code = 99
        os._exit(code)
    # Wait in a thread with a bound: a hung child must fail the test, not hang the suite.
    statuses: list[int] = []
    reaper = threading.Thread(target=lambda: statuses.append(os.waitpid(pid, 0)[1]), daemon=True)
    reaper.start()
    reaper.join(30)
    if statuses:
        return os.waitstatus_to_exitcode(statuses[0])
    os.kill(pid, signal.SIGKILL)
    reaper.join(5)
    raise AssertionError("the forked child did not finish within 30 s")


def test_a_started_bus_cannot_be_used_in_a_forked_child(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    bus = make_bus(client.shop.orders)
    bus.subscribe(lambda ev: None)
    bus.start()

    def child() -> int:
        try:
            bus.join(1)
        except me.BusStateError as exc:
            return 0 if "post_fork" in str(exc) and "forked child" in str(exc) else 2
        return 1

    assert _in_child(child) == 0


def test_a_bus_created_before_fork_and_started_after_works(fake_rs: FakeReplicaSet) -> None:
    c: pymongo.MongoClient[Any] = pymongo.MongoClient(fake_rs.uri, **CLIENT_OPTIONS)
    bus = me.Bus(c.shop.orders, **FAST)
    got = threading.Event()
    bus.subscribe(lambda ev: got.set())

    def child() -> int:
        bus.start()
        c.shop.orders.insert_one({"_id": "from-child"})
        ok = got.wait(10)
        bus.stop(5)
        return 0 if ok else 1

    assert _in_child(child) == 0
    assert bus.state is me.BusState.NEW  # the parent's bus was never started
    c.close()


def test_uwsgi_without_threads_is_refused(
    client: pymongo.MongoClient[Any], make_bus: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = make_bus(client.shop.orders)
    bus.subscribe(lambda ev: None)
    monkeypatch.setitem(sys.modules, "uwsgi", types.SimpleNamespace(opt={"master": True}))
    with pytest.raises(me.ConfigurationError, match="enable-threads"):
        bus.start()
    monkeypatch.setitem(sys.modules, "uwsgi", types.SimpleNamespace(opt={"enable-threads": True}))
    bus.start()
    assert bus.state is me.BusState.RUNNING
