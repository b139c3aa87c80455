"""``BusRegistry.run_forever()``, the Flask and Django runners' loop, on a second signal (a real process).

A second SIGINT/SIGTERM stops every bus at once, as ``Bus.run_forever()`` does: no more
waiting for callbacks, one bounded checkpoint write per bus, then exit status 128 + the signal.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pymongo
import pytest

import mongo_events as me
from mongo_events.contrib.registry import HURRY_MARGIN
from mongo_events.lifecycle import FINAL_FLUSH_MIN
from mongo_events.testing import FakeReplicaSet

from .helpers import FAST, Recorder
from .test_runners import Lines, _django_project, _env

# The flusher never writes on its own while the test runs (flush_interval): the only
# checkpoint write that can cover the finished events is the final one, made by the stop.
_RUNNER = """
import sys, threading
import mongo_events as me
from mongo_events.contrib.registry import BusRegistry
from mongo_events.runner import ensure_logging

ensure_logging()
uri, path, mode = sys.argv[1:4]
never = threading.Event()
stuck = threading.Event()

class Store(me.FileResumeTokenStore):
    def save(self, *args, **kwargs):
        if stuck.is_set():  # "stuck" mode: the final checkpoint write never returns
            never.wait()
        return super().save(*args, **kwargs)

spec = {
    "database": "shop",
    "collection": "orders",
    "resume_token_id": "runner",
    "resume_token_store": Store(path),
    "max_await_time": 0.05,
    "flush_interval": 600,
    "client_options": {"serverSelectionTimeoutMS": 5000},
}
registry = BusRegistry({"orders": spec}, uri=uri)

@registry.subscribe("orders")
def on(ev):
    if ev.document_id == "blocked":
        if mode == "stuck":
            stuck.set()
        print("blocked", flush=True)
        never.wait()  # never returns
    print("done", ev.document_id, flush=True)

sys.exit(registry.run_forever(600, ready=lambda: print("ready", flush=True)))
"""

#: How long the whole second-signal stop of one bus may take: its one bounded checkpoint
#: write, or else the runner's fallback exit, plus slack for a loaded machine.
_BOUND = FINAL_FLUSH_MIN + HURRY_MARGIN + 3.0


@attrs.frozen
class _Ended:
    """How a runner ended after two SIGTERMs."""

    code: int
    took: float  # seconds from the second SIGTERM to the exit
    log: str  # its stderr
    before: me.Checkpoint | None  # the stored checkpoint once it ran, before the events


@pytest.fixture
def second_signal(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], tmp_path: Path
) -> Iterator[Callable[[str], _Ended]]:
    """Runs the runner in ``mode`` ("ok" or "stuck") until two SIGTERMs end it; always reaped."""
    procs: list[subprocess.Popen[str]] = []

    def run(mode: str) -> _Ended:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(_RUNNER),
                fake_rs.uri,
                str(tmp_path / "tokens.json"),
                mode,
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        out.wait_for("^ready$")
        before = me.FileResumeTokenStore(tmp_path / "tokens.json").load(_KEY)
        # Given two events that finished, then one whose callback never returns.
        client.shop.orders.insert_one({"_id": "first"})
        out.wait_for("^done first$")
        client.shop.orders.insert_one({"_id": "second"})
        out.wait_for("^done second$")
        client.shop.orders.insert_one({"_id": "blocked"})
        out.wait_for("^blocked$")
        # When SIGTERM comes twice (the first waits up to 600 s for the callback).
        proc.send_signal(signal.SIGTERM)
        err.wait_for("stopping gracefully")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(_BOUND)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the second SIGTERM did not end the runner within {_BOUND}s\n{''.join(err.lines)}"
            ) from None
        return _Ended(code, time.monotonic() - sent, err.rest(), before)

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    print(f"fake replica set: {fake_rs.uri}")  # shown when the test failed


_KEY = "shop.orders:runner"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_second_signal_stops_every_bus_at_once_with_one_bounded_checkpoint_write(
    second_signal: Callable[[str], _Ended], client: pymongo.MongoClient[Any], tmp_path: Path
) -> None:
    ended = second_signal("ok")
    # Then the exit status names the signal, and the runner ended within the bound...
    assert ended.code == 128 + signal.SIGTERM, ended.log
    assert ended.took < _BOUND, ended.log
    assert "second signal" in ended.log
    assert "bus orders stopped" in ended.log
    # ...after the bus's final checkpoint write: it covers the finished events, not the blocked one.
    after = me.FileResumeTokenStore(tmp_path / "tokens.json").load(_KEY)
    assert after is not None, f"no checkpoint stored\n{ended.log}"
    assert after.token != getattr(ended.before, "token", None), f"the pre-run position\n{ended.log}"
    assert _redelivered(client, tmp_path / "tokens.json") == ["blocked"], ended.log


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_second_signal_exits_at_once_when_the_final_write_never_returns(
    second_signal: Callable[[str], _Ended],
) -> None:
    # Given a store whose final write never returns (the flush bound covers MongoDB, not this).
    ended = second_signal("stuck")
    # Then the runner gives up after FINAL_FLUSH_MIN per bus plus the margin, says why,
    # and still exits with the signal's status.
    assert ended.code == 128 + signal.SIGTERM, ended.log
    assert FINAL_FLUSH_MIN + HURRY_MARGIN - 0.5 < ended.took < _BOUND, ended.log
    bound = re.escape(f"{FINAL_FLUSH_MIN + HURRY_MARGIN:.1f}s")
    assert re.search(
        rf"WARNING .*did not end within {bound} \(still stopping: orders\); exiting now", ended.log
    ), ended.log
    assert "bus orders stopped" not in ended.log


def _redelivered(client: pymongo.MongoClient[Any], tokens: Path) -> list[Any]:
    """What a restart from the stored checkpoint delivers again, up to the blocked event."""
    seen = Recorder()
    bus = me.Bus(
        client.shop.orders,
        resume_token_store=me.FileResumeTokenStore(tokens),
        resume_token_id="runner",
        **FAST,
    )
    bus.subscribe(lambda ev: seen.add(ev.document_id))
    bus.start()
    try:
        # Stream order: anything redelivered before the blocked event was received before it.
        seen.wait_until(lambda ids: "blocked" in ids)
        assert bus.join(10)
        return sorted(seen.items, key=["first", "second", "blocked"].index)
    finally:
        bus.stop(5)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_django_command_exits_with_the_second_signals_status_and_no_failure_line(
    tmp_path: Path, fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any]
) -> None:
    project = _django_project(tmp_path, fake_rs.uri, autostart=False)
    (project / "shopapp" / "events.py").write_text(
        "import threading\n"
        "from mongo_events.contrib.django import subscribe\n"
        "@subscribe('orders')\n"
        "def on_order(ev):\n    print('got', ev.document_id, flush=True)\n    threading.Event().wait()\n"
    )
    settings = project / "settings.py"
    settings.write_text(settings.read_text().replace('"STOP_TIMEOUT": 5', '"STOP_TIMEOUT": 600'))
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "run_mongo_events"],
        cwd=project,
        env=_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        err.wait_for("running orders")
        client.shop.orders.insert_one({"_id": 1})
        out.wait_for("got 1")
        proc.send_signal(signal.SIGTERM)
        err.wait_for("stopping gracefully")
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(_BOUND)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit within {_BOUND}s\n{''.join(err.lines)}") from None
        log = err.rest()
        assert code == 128 + signal.SIGTERM, log
        # Stopped by an operator, not by a failure: no "mongo-events: failed" summary.
        assert "mongo-events: failed" not in log and "CommandError" not in log, log
        assert "bus orders stopped" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class _Exited(BaseException):
    """Raised by the stand-in for ``os._exit``: it ends the watchdog as the real one would."""


@pytest.mark.parametrize("failing", ["first", "second"])
def test_the_second_signals_watchdog_exits_at_its_bound_even_when_logging_raises(
    monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    from mongo_events.contrib import registry

    calls: list[str] = []

    def warning(msg: str, *args: Any) -> None:
        calls.append(msg)
        if (failing == "first") == (len(calls) == 1):
            raise RuntimeError("a logging handler that raises")

    def exit_(code: int) -> None:
        raise _Exited(code)

    monkeypatch.setattr(registry.log, "warning", warning)
    monkeypatch.setattr(registry.os, "_exit", exit_)
    monkeypatch.setattr(registry, "FINAL_FLUSH_MIN", 0.01)
    monkeypatch.setattr(registry, "HURRY_MARGIN", 0.0)
    with pytest.raises(_Exited) as exited:
        registry._watch_hurried_stop(signal.SIGTERM, [], threading.Event())  # the stop never ends
    assert exited.value.args == (128 + signal.SIGTERM,)
    assert len(calls) == 2  # it still tried to say why
