"""Shutdown is bounded, always (issue 15, items 9 to 12).

Every wait here is bounded far above what a correct stop needs: a stop that takes
its full (long) timeout, or never ends, fails the test instead of hanging it.
"""

from __future__ import annotations

import concurrent.futures.thread
import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymongo
import pytest

import mongo_events as me
from mongo_events.testing import FakeReplicaSet

from .helpers import Recorder

ROOT = Path(__file__).resolve().parent.parent


def _returns_within(fn: Callable[[], Any], bound: float) -> tuple[bool, BaseException | None]:
    """Run ``fn`` in a thread; whether it returned within ``bound`` seconds, and what it raised."""
    done = threading.Event()
    raised: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            raised.append(exc)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    finished = done.wait(bound)
    return finished, raised[0] if raised else None


def _bus_threads() -> list[str]:
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith("mongo_events.") and not t.name.startswith("mongo_events.fake_rs")
    ]


# -- 9. stop() on a bus that never started returns at once ------------------------------------------


def test_stop_on_a_bus_that_never_started_returns_at_once(client: pymongo.MongoClient[Any]) -> None:
    bus = me.Bus(client.shop.orders)
    bus.subscribe(lambda ev: None)
    finished, raised = _returns_within(lambda: bus.stop(timeout=600), 10)
    assert finished and raised is None, "stop() waited for a bus that never started"
    assert bus.state is me.BusState.NEW


def test_stop_after_a_failed_start_returns_at_once(client: pymongo.MongoClient[Any]) -> None:
    class Broken(me.MemoryResumeTokenStore):
        def load(self, key: str) -> me.Checkpoint | None:
            raise me.StoreError("unreachable")

    bus = me.Bus(client.shop.orders, resume_token_store=Broken())
    bus.subscribe(lambda ev: None)
    with pytest.raises(me.StoreError):
        bus.start()
    finished, _ = _returns_within(lambda: bus.stop(timeout=600), 10)
    assert finished


# -- 10. the final flush is bounded when the store's server is unreachable -----------------------------


def test_stop_is_bounded_when_the_store_server_is_unreachable(
    client: pymongo.MongoClient[Any], make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store_rs = FakeReplicaSet().start()
    try:
        # pymongo's defaults: 30 s server selection, no socket timeout.
        store_client: pymongo.MongoClient[Any] = pymongo.MongoClient(store_rs.uri)
        store = me.MongoResumeTokenStore(store_client.internal.tokens)
        seen = Recorder()
        bus = make_bus(client.shop.orders, resume_token_store=store, flush_interval=0.05)
        bus.subscribe(lambda ev: seen.add(ev.document_id))
        bus.start()
        client.shop.orders.insert_one({"_id": 1})
        seen.wait(1)
        store_rs.stop()  # the store's server goes away
        client.shop.orders.insert_one({"_id": 2})
        seen.wait(2)
        with caplog.at_level(logging.ERROR, logger="mongo_events"):
            finished, raised = _returns_within(lambda: bus.stop(timeout=1.0), 15)
        assert finished, "stop(timeout=1) waited for pymongo's default timeouts"
        assert raised is None
        assert bus.state is me.BusState.STOPPED
        assert any("final checkpoint was not stored" in r.getMessage() for r in caplog.records), [
            r.getMessage() for r in caplog.records
        ]
        store_client.close()
    finally:
        store_rs.stop()


# -- 11. a callback that never returns does not keep the process alive ------------------------------------

_BLOCKED_AFTER_STOP = """
import sys, threading
import pymongo
import mongo_events as me

client = pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=5000)
entered = threading.Event()

def forever(ev):
    entered.set()
    threading.Event().wait()  # never returns

bus = me.Bus(client.shop.orders, resume=False, max_await_time=0.05, flush_interval=0.05)
bus.subscribe(forever)
bus.start()
print("started", flush=True)
assert entered.wait(30), "the callback never ran"
try:
    bus.stop(timeout=0.5)
except me.ShutdownTimeout as exc:
    print("timeout:", exc, flush=True)
print("stopped", bus.state.value, flush=True)
"""

_SECOND_SIGNAL = """
import logging, sys, threading
import pymongo
import mongo_events as me

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
client = pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=5000)

def forever(ev):
    print("entered", flush=True)
    threading.Event().wait()  # never returns

bus = me.Bus(client.shop.orders, resume_token_store=me.FileResumeTokenStore(sys.argv[2]), max_await_time=0.05, flush_interval=0.05)
bus.subscribe(forever)
bus.start()
print("started", flush=True)
bus.run_forever(stop_timeout=600)
print("returned", bus.state.value, flush=True)
"""


class _Lines:
    """Lines of a child's stream, read on a thread, waited for with a bound."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line)

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        try:
            while not deadline.is_set():
                try:
                    line = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                self.lines.append(line)
                if text in line:
                    return line
        finally:
            timer.cancel()
        raise AssertionError(f"no line with {text!r} within {timeout}s; got {self.lines!r}")


def _child(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(proc: subprocess.Popen[str], bound: float, why: str) -> int:
    try:
        return proc.wait(bound)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(why) from None


def test_a_callback_that_never_returns_does_not_keep_the_process_alive_after_stop(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any]
) -> None:
    proc = _child(_BLOCKED_AFTER_STOP, fake_rs.uri)
    out = _Lines(proc.stdout)
    out.wait_for("started")
    client.shop.orders.insert_one({"_id": 1})
    timeout_line = out.wait_for("timeout:")
    assert "forever" in timeout_line  # ShutdownTimeout names the callback still running
    out.wait_for("stopped")
    code = _finish(
        proc, 30, "the process did not exit after stop() returned: a blocked callback kept it alive"
    )
    assert code == 0, proc.stderr.read() if proc.stderr else ""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_second_signal_in_run_forever_stops_at_once(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.json"
    proc = _child(_SECOND_SIGNAL, fake_rs.uri, str(tokens))
    out, err = _Lines(proc.stdout), _Lines(proc.stderr)
    out.wait_for("started")
    client.shop.orders.insert_one({"_id": 1})
    out.wait_for("entered")
    proc.send_signal(signal.SIGTERM)
    err.wait_for("stopping gracefully")  # the first waits for the callback (up to 600 s) ...
    proc.send_signal(signal.SIGTERM)
    err.wait_for("stopping now")  # ... the second does not
    code = _finish(proc, 30, "a second SIGTERM did not stop run_forever() at once")
    assert code == 0
    out.wait_for("returned stopped")
    assert me.FileResumeTokenStore(tokens).load("shop.orders:" + _hostname()) is not None


def _hostname() -> str:
    import socket

    return socket.gethostname() or "default"


# -- 12. when stop() returns, the bus's threads have ended ---------------------------------------------


def test_when_stop_returns_every_bus_thread_has_ended(client: pymongo.MongoClient[Any]) -> None:
    before = set(_bus_threads())
    seen = Recorder()
    bus = me.Bus(client.shop.orders, max_workers=8, max_await_time=0.05, flush_interval=0.05)
    bus.subscribe(lambda ev: seen.add(ev.document_id))
    bus.start()
    client.shop.orders.insert_many([{"_id": i} for i in range(20)])
    seen.wait(20)
    bus.stop()
    assert set(_bus_threads()) - before == set()


def test_workers_are_daemon_executor_threads_left_out_of_the_exit_join(
    client: pymongo.MongoClient[Any],
) -> None:
    # The workers run on a ThreadPoolExecutor (the product's shape). concurrent.futures joins
    # the threads in this registry at exit; ours must not be there, or a callback that never
    # returns would hold the process. This fails loudly if the stdlib renames the registry.
    registry = concurrent.futures.thread._threads_queues
    bus = me.Bus(client.shop.orders, max_workers=3, max_await_time=0.05)
    bus.subscribe(lambda ev: None)
    bus.start()
    try:
        workers = [t for t in threading.enumerate() if t.name.startswith("mongo_events.worker[shop.orders]")]
        assert len(workers) == 3
        assert all(t.daemon for t in workers)
        assert not any(t in registry for t in workers)
    finally:
        bus.stop()


def test_shutdown_timeout_names_the_callbacks_still_running(client: pymongo.MongoClient[Any]) -> None:
    before = set(_bus_threads())
    release = threading.Event()
    entered = threading.Event()

    def slow(ev: me.ChangeEvent) -> None:
        entered.set()
        release.wait(30)

    bus = me.Bus(client.shop.orders, max_workers=4, max_await_time=0.05, flush_interval=0.05)
    bus.subscribe(slow, name="slow-one")
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    assert entered.wait(10)
    with pytest.raises(me.ShutdownTimeout) as info:
        bus.stop(timeout=0.2)
    assert "'slow-one'" in str(info.value) and "on event" in str(info.value)
    left = set(_bus_threads()) - before
    assert len(left) == 1 and next(iter(left)).startswith("mongo_events.worker"), left  # only the busy worker
    release.set()
    (thread,) = [t for t in threading.enumerate() if t.name in left]
    thread.join(10)
    assert not thread.is_alive()


def test_stop_during_a_failures_shutdown_keeps_its_own_bound(client: pymongo.MongoClient[Any]) -> None:
    # A failure starts a shutdown in the background that waits up to 30 s for a blocked
    # callback; a stop(timeout) called meanwhile must not wait for all of that.
    release = threading.Event()
    blocked = threading.Event()

    def callback(ev: me.ChangeEvent) -> None:
        if ev.document_id == 1:
            blocked.set()
            release.wait(60)
        else:
            raise SystemExit("the callback exits")  # fails the bus

    bus = me.Bus(client.shop.orders, max_workers=2, max_await_time=0.05, flush_interval=0.05)
    bus.subscribe(callback, name="h")
    bus.start()
    try:
        client.shop.orders.insert_one({"_id": 1})
        assert blocked.wait(10)
        client.shop.orders.insert_one({"_id": 2})
        with pytest.raises(me.ThreadFailed):
            bus.join(10)  # failed; its shutdown now waits (up to 30 s) for doc 1's callback
        finished, raised = _returns_within(lambda: bus.stop(timeout=0.5), 10.0)
        assert finished, "stop(0.5) waited for the failure's whole shutdown (30 s)"
        # Either the failure's shutdown was under way (stop waits for it within its bound), or
        # this stop ran the shutdown itself and names the callback still running.
        assert raised is None or isinstance(raised, me.ShutdownTimeout), raised
    finally:
        release.set()
