"""What an operator sees from the runners: logs when the app set up none, why a bus stopped,
a second signal, an orderly exit, and where autostart starts buses (real processes)."""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest

import mongo_events as me
from mongo_events.runner import ensure_logging, exit_summary
from mongo_events.testing import FakeReplicaSet

from .test_examples import ROOT

# A URI nothing answers: a failing bus, quickly.
DEAD_URI = "mongodb://127.0.0.1:1/?replicaSet=rs0&serverSelectionTimeoutMS=300&connectTimeoutMS=300"


class Lines:
    """Reads a process's stream on a thread; :meth:`wait_for` waits (bounded) for a matching line."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 20.0) -> str:
        regex = re.compile(pattern)
        for line in self.lines:
            if regex.search(line):
                return line
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout}s; got:\n{''.join(self.lines)}"
                ) from None
            if line is None:
                raise AssertionError(f"stream ended without {pattern!r}; got:\n{''.join(self.lines)}")
            self.lines.append(line)
            if regex.search(line):
                return line

    def rest(self, timeout: float = 20.0) -> str:
        while True:
            line = self._queue.get(timeout=timeout)
            if line is None:
                return "".join(self.lines)
            self.lines.append(line)


def _env(*paths: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MONGODB_URI", "WERKZEUG_RUN_MAIN", "RUN_MAIN")}
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in paths), str(ROOT)])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _popen(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- ensure_logging ------------------------------------------------------------------------------------


def test_ensure_logging_installs_a_stderr_handler_only_when_nothing_is_configured() -> None:
    code = textwrap.dedent(
        """
        import logging, sys
        from mongo_events.runner import ensure_logging
        mode = sys.argv[1]
        if mode == "configured":
            logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="APP %(message)s")
        print("installed" if ensure_logging() else "left alone")
        print("again" if ensure_logging() else "once")
        logging.getLogger("mongo_events.bus").info("an info record")
        logging.getLogger("other").warning("not ours")
        """
    )
    bare = subprocess.run(
        [sys.executable, "-c", code, "bare"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert bare.stdout.split() == ["installed", "once"]
    assert "INFO mongo_events.bus: an info record" in bare.stderr
    assert bare.stderr.count("an info record") == 1
    # Other loggers are the application's business (Python's last resort still shows this one).
    assert "INFO other" not in bare.stderr
    configured = subprocess.run(
        [sys.executable, "-c", code, "configured"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert configured.stdout.splitlines()[:2] == ["left alone", "once"]
    assert "APP an info record" in configured.stdout and "an info record" not in configured.stderr


def test_the_library_itself_keeps_its_null_handler() -> None:
    import mongo_events  # noqa: F401

    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("mongo_events").handlers)


def test_exit_summary_names_the_bus_and_the_error() -> None:
    assert exit_summary("orders", ValueError("boom\nmore")) == "mongo-events: bus orders failed: boom more"
    assert exit_summary(None, "bus 'x' has no MongoDB URI") == "mongo-events: bus 'x' has no MongoDB URI"
    assert ensure_logging.__doc__


def test_run_forever_prints_why_a_bus_failed_without_any_logging_setup() -> None:
    code = textwrap.dedent(
        f"""
        import pymongo, mongo_events as me
        client = pymongo.MongoClient({DEAD_URI!r})
        bus = me.Bus(client.shop.orders, name="orders")
        bus.subscribe(lambda ev: None)
        bus.run_forever()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    # The traceback ends the output; before it, the bus's log (in the runner's format: Python's
    # last-resort handler would print the bare message) said what went wrong.
    assert re.search(r"(ERROR|WARNING) mongo_events\.bus: .*Connection refused", result.stderr), result.stderr


# -- flask mongo-events run ----------------------------------------------------------------------------------


def _flask_app(
    tmp_path: Path,
    uri: str,
    callback: str = "print('got', ev.document_id, flush=True)",
    prelude: str = "",
    **config: Any,
) -> Path:
    lines = [
        prelude,
        "import threading",
        "import flask",
        "from mongo_events.contrib.flask import MongoEvents",
        "app = flask.Flask(__name__)",
        "app.add_url_rule('/', 'index', lambda: 'ok')",
        f"app.config['MONGO_EVENTS_URI'] = {uri!r}",
        "app.config['MONGO_EVENTS_BUSES'] = {'orders': {'database': 'shop', 'collection': 'orders', 'max_await_time': 0.05}}",
        *(f"app.config[{k!r}] = {v!r}" for k, v in config.items()),
        "events = MongoEvents(app)",
        "never = threading.Event()",
        "@events.subscribe('orders')",
        "def on(ev):",
        f"    {callback}",
    ]
    (tmp_path / "flaskapp.py").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_flask_run_exits_1_naming_the_bus_and_the_error(tmp_path: Path) -> None:
    _flask_app(tmp_path, DEAD_URI)
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "flaskapp", "mongo-events", "run"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mongo-events: bus orders failed: "), result.stderr
    assert "Traceback" not in result.stderr


def test_flask_run_second_signal_stops_at_once(
    tmp_path: Path, fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], procs: list[Any]
) -> None:
    # Given a callback that never returns and a stop timeout far longer than the test's waits.
    _flask_app(
        tmp_path,
        fake_rs.uri,
        callback="print('got', ev.document_id, flush=True); never.wait()",
        MONGO_EVENTS_STOP_TIMEOUT=600,
    )
    proc = _popen(
        [sys.executable, "-m", "flask", "--app", "flaskapp", "mongo-events", "run"], tmp_path, _env(tmp_path)
    )
    procs.append(proc)
    err, out = Lines(proc.stderr), Lines(proc.stdout)
    err.wait_for("running orders")
    client.shop.orders.insert_one({"_id": 1})
    out.wait_for("got 1")
    proc.send_signal(signal.SIGTERM)
    err.wait_for("stopping gracefully")  # the first signal waits for the callback...
    proc.send_signal(signal.SIGTERM)  # ...the second does not
    assert proc.wait(20) == 128 + signal.SIGTERM
    assert "second signal" in err.rest()


def test_flask_autostart_orderly_exit_stops_buses_before_the_exit_hook(
    tmp_path: Path, fake_rs: FakeReplicaSet
) -> None:
    _flask_app(tmp_path, fake_rs.uri, MONGO_EVENTS_AUTOSTART=True, MONGO_EVENTS_STOP_TIMEOUT=5)
    script = textwrap.dedent(
        """
        import logging
        logging.basicConfig(level=logging.INFO)
        from flaskapp import app, events
        assert app.test_client().get("/").status_code == 200
        print(events.bus("orders").state.value, flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "running"
    assert "bus orders stopped" in result.stderr, result.stderr
    assert "interpreter exiting while bus" not in result.stderr


def test_gunicorn_preload_never_starts_buses_in_the_master(
    tmp_path: Path, fake_rs: FakeReplicaSet, procs: list[Any]
) -> None:
    pytest.importorskip("gunicorn", reason="install the test extra (gunicorn)")
    import gunicorn.config

    prelude = "import logging; logging.basicConfig(level=logging.INFO)"
    _flask_app(
        tmp_path, fake_rs.uri, prelude=prelude, MONGO_EVENTS_AUTOSTART=True, MONGO_EVENTS_STOP_TIMEOUT=5
    )
    port = _free_port()
    # Newer gunicorns open a control socket in the home directory unless told not to.
    quiet = (
        ["--no-control-socket"]
        if any(s.name == "control_socket_disable" for s in gunicorn.config.KNOWN_SETTINGS)
        else []
    )
    proc = _popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            "--workers",
            "1",
            "--bind",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "10",
            *quiet,
            "flaskapp:app",
        ],
        tmp_path,
        _env(tmp_path),
    )
    procs.append(proc)
    err = Lines(proc.stderr)
    worker = int(err.wait_for(r"Booting worker with pid: \d+").split("pid:")[1])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20) as response:
        assert response.read() == b"ok"
    started = err.wait_for(r"started bus orders in process \d+")
    assert int(started.rsplit(" ", 1)[1]) == worker != proc.pid
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    rest = err.rest()
    assert f"in process {proc.pid}" not in "".join(err.lines)
    assert "interpreter exiting while bus" not in rest


# -- Django: manage.py ---------------------------------------------------------------------------------------


def _django_project(tmp_path: Path, uri: str, autostart: bool = True) -> Path:
    (tmp_path / "shopapp").mkdir()
    (tmp_path / "shopapp" / "__init__.py").write_text("")
    (tmp_path / "shopapp" / "events.py").write_text(
        "from mongo_events.contrib.django import subscribe\n"
        "@subscribe('orders')\n"
        "def on_order(ev):\n    print('got', ev.document_id, flush=True)\n"
    )
    (tmp_path / "urls.py").write_text(
        "from django.http import HttpResponse\nfrom django.urls import path\n"
        "urlpatterns = [path('', lambda request: HttpResponse('ok'))]\n"
    )
    (tmp_path / "settings.py").write_text(
        textwrap.dedent(
            f"""
        SECRET_KEY = "test"
        DEBUG = True
        ALLOWED_HOSTS = ["*"]
        ROOT_URLCONF = "urls"
        INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "mongo_events.contrib.django", "shopapp"]
        DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}}}
        USE_TZ = True
        MONGO_EVENTS = {{
            "URI": {uri!r},
            "BUSES": {{"orders": {{"database": "shop", "collection": "orders", "max_await_time": 0.05}}}},
            "AUTOSTART": {autostart!r},
            "STOP_TIMEOUT": 5,
        }}
        LOGGING = {{
            "version": 1,
            "handlers": {{"stderr": {{"class": "logging.StreamHandler"}}}},
            "loggers": {{"mongo_events": {{"handlers": ["stderr"], "level": "INFO"}}}},
        }}
        """
        )
    )
    (tmp_path / "manage.py").write_text(
        "import os, sys\nos.environ.setdefault('DJANGO_SETTINGS_MODULE', 'settings')\n"
        "from django.core.management import execute_from_command_line\nexecute_from_command_line(sys.argv)\n"
    )
    return tmp_path


@pytest.mark.parametrize(
    "command", [["check"], ["migrate", "--noinput"], ["shell", "-c", "print('shell ran')"]]
)
def test_django_autostart_never_starts_buses_in_management_commands(
    tmp_path: Path, fake_rs: FakeReplicaSet, command: list[str]
) -> None:
    project = _django_project(tmp_path, fake_rs.uri)
    result = subprocess.run(
        [sys.executable, "manage.py", *command],
        cwd=project,
        env=_env(project),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "started" not in result.stderr, result.stderr
    if command[0] == "shell":
        assert "shell ran" in result.stdout


def test_django_autostart_starts_buses_in_runserver_noreload(
    tmp_path: Path, fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], procs: list[Any]
) -> None:
    project = _django_project(tmp_path, fake_rs.uri)
    port = _free_port()
    proc = _popen(
        [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"], project, _env(project)
    )
    procs.append(proc)
    err, out = Lines(proc.stderr), Lines(proc.stdout)
    out.wait_for("Quit the server with")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20) as response:
        assert response.read() == b"ok"
    err.wait_for(f"started bus orders in process {proc.pid}")
    client.shop.orders.insert_one({"_id": 5})
    out.wait_for("got 5")


def test_django_command_exits_non_zero_naming_the_bus_and_the_error(tmp_path: Path) -> None:
    project = _django_project(tmp_path, DEAD_URI, autostart=False)
    (project / "settings.py").write_text(
        (project / "settings.py").read_text().replace("LOGGING = {", "UNUSED_LOGGING = {")
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "run_mongo_events"],
        cwd=project,
        env=_env(project),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 1
    assert re.search(r"mongo-events: bus orders failed: .+", result.stderr.strip().splitlines()[-1]), (
        result.stderr
    )
    # With no LOGGING of the project's own for mongo_events, the runner printed the log too.
    assert "WARNING mongo_events" in result.stderr or "ERROR mongo_events" in result.stderr, result.stderr


# -- nothing subscribed ---------------------------------------------------------------------------------------


def test_run_forever_refuses_to_run_when_no_bus_has_subscriptions() -> None:
    from mongo_events.contrib.registry import BusRegistry

    registry = BusRegistry({"orders": {"database": "shop", "collection": "orders"}}, uri=DEAD_URI)
    announced: list[list[str]] = []
    with pytest.raises(me.ConfigurationError, match=r"no bus has subscriptions.*orders.*imported"):
        registry.run_forever(1.0, ready=lambda: announced.append(registry.started))
    assert announced == []  # never announced as running
    assert registry.started == []
    registry.stop(1.0)


def test_flask_run_exits_1_when_the_subscriptions_were_not_imported(tmp_path: Path) -> None:
    (tmp_path / "flaskapp.py").write_text(
        "import flask\n"
        "from mongo_events.contrib.flask import MongoEvents\n"
        "app = flask.Flask(__name__)\n"
        f"app.config['MONGO_EVENTS_URI'] = {DEAD_URI!r}\n"
        "app.config['MONGO_EVENTS_BUSES'] = {'orders': {'database': 'shop', 'collection': 'orders'}}\n"
        "events = MongoEvents(app)\n"  # the module with @events.subscribe('orders') is never imported
    )
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "flaskapp", "mongo-events", "run"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "running" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mongo-events: no bus has subscriptions") and "orders" in last, result.stderr
