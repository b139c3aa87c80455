"""``python -m mongo_events.testing.server``: a process that stops at once when told to."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from pymongo.errors import PyMongoError

from ..helpers import fail_command
from .support import app_name, client


def _start(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mongo_events.testing.server", "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_exits_within_a_second_of_the_signal_while_busy(sig: int, tmp_path: Any) -> None:
    """Given a getMore waiting for changes and a command held by a blocking fail point,
    a signal still ends the process at once, with status 0."""
    proc, uri = _start("--data-dir", str(tmp_path))
    try:
        name = app_name()
        c = client(uri, appname=name, retryReads=False, serverSelectionTimeoutMS=500)
        c.db.x.insert_one({"_id": 1})
        stream = c.db.x.watch(max_await_time_ms=30_000)
        errors: list[BaseException] = []

        def call(fn: Any) -> None:
            try:
                fn()
            except PyMongoError as exc:
                errors.append(exc)

        entered = c.admin.command(
            {
                "configureFailPoint": "failCommand",
                "mode": "alwaysOn",
                "data": {
                    "failCommands": ["find"],
                    "blockConnection": True,
                    "blockTimeMS": 30_000,
                    "appName": name,
                },
            }
        )["count"]
        threads = [
            threading.Thread(target=call, args=(fn,), daemon=True)
            for fn in (stream.try_next, lambda: c.db.x.find_one({}))
        ]
        for t in threads:
            t.start()
        c.admin.command({"waitForFailPoint": "failCommand", "timesEntered": entered + 1, "maxTimeMS": 10_000})
        start = time.monotonic()
        proc.send_signal(sig)
        try:
            code = proc.wait(timeout=2.0)  # the promise is one second; the rest is slack for a loaded machine
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server was still running 2 s after {signal.Signals(sig).name}")
        print(f"exited {time.monotonic() - start:.3f}s after the signal")
        assert code == 0
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_max_event_size_flag_sets_the_limit() -> None:
    proc, uri = _start("--max-event-size", "2000")
    try:
        c = client(uri)
        coll = c.db.x
        coll.insert_one({"_id": 0})
        with coll.watch(max_await_time_ms=100) as stream:
            coll.insert_one({"_id": 1, "pad": "x" * 3000})
            with pytest.raises(PyMongoError) as info:
                while stream.try_next() is None:
                    pass
        assert info.value.details is not None and info.value.details["code"] == 10334
        c.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_enable_test_commands_can_be_turned_off() -> None:
    proc, uri = _start("--disable-test-commands")
    try:
        c = client(uri)
        assert c.admin.command({"getParameter": 1, "enableTestCommands": 1})["enableTestCommands"] is False
        with pytest.raises(PyMongoError):
            with fail_command(c, "alwaysOn", failCommands=["find"], errorCode=2):
                pass
        c.close()
    finally:
        proc.terminate()
        proc.wait(10)
