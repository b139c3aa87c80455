"""Test helpers: a thread-safe recorder that tests wait on."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pymongo.errors import AutoReconnect

import mongo_events as me

#: Bus options that make tests quick: short getMore waits and flushes.
FAST: dict[str, Any] = {"max_await_time": 0.05, "flush_interval": 0.05, "start_timeout": 5.0}
#: Retry delays of a few milliseconds.
QUICK = me.RetryBackoff(min=0.001, max=0.01)


class Recorder:
    """Collects values from callbacks; ``wait(n)`` blocks on a condition until n arrived."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._cond = threading.Condition()

    def add(self, item: Any) -> None:
        with self._cond:
            self.items.append(item)
            self._cond.notify_all()

    def wait(self, n: int, timeout: float = 10.0) -> list[Any]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.items) >= n, timeout)
            assert ok, f"waited {timeout}s for {n} items, got {len(self.items)}: {self.items[:10]!r}"
            return list(self.items)

    def wait_until(self, predicate: Callable[[list[Any]], bool], timeout: float = 10.0) -> list[Any]:
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self.items), timeout)
            assert ok, f"condition not met within {timeout}s; have {len(self.items)} items"
            return list(self.items)

    def __len__(self) -> int:
        with self._cond:
            return len(self.items)


def stop_gracefully(proc: subprocess.Popen[str], timeout: float = 20.0) -> int:
    """SIGTERM a long-running command, as a process manager would; returns its exit code."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


@dataclasses.dataclass
class Item:
    """A nested payload type for the decoding tests."""

    sku: str
    qty: int


@contextlib.contextmanager
def fail_command(client: Any, mode: Any, **data: Any) -> Iterator[dict[str, Any]]:
    """Arm MongoDB's ``failCommand`` fail point for the block, then turn it off.

    Works on the fake replica set and on any server started with
    ``--setParameter enableTestCommands=1``. It applies only to connections of
    ``client``'s application name when it has one (``appName``), so tests
    sharing a real server do not fail each other's commands.
    """
    app = (client.options.pool_options.metadata.get("application") or {}).get("name")
    if app is not None:
        data.setdefault("appName", app)
    reply: dict[str, Any] = client.admin.command(
        {"configureFailPoint": "failCommand", "mode": mode, "data": data}
    )
    try:
        yield reply
    finally:
        _admin_command(client, {"configureFailPoint": "failCommand", "mode": "off"})


def require_fail_points(client: Any) -> None:
    """Skip on a real server that was started without test commands (it cannot run fail-point tests)."""
    import pytest

    try:
        enabled = client.admin.command({"getParameter": 1, "enableTestCommands": 1}).get("enableTestCommands")
    except Exception:
        enabled = False
    if not enabled:
        pytest.skip("the server was started without --setParameter enableTestCommands=1")


def _admin_command(client: Any, command: dict[str, Any], timeout: float = 10.0) -> Any:
    """Run an idempotent admin ``command``, again after any :class:`AutoReconnect` until ``timeout``.

    A fail point that answers with a shutdown error or drops the connection makes pymongo
    mark the server unknown and then pause the whole pool of the client that received
    it, until its monitor sees the server again; a control command that selected the
    server just before fails at checkout, on pymongo's one retry too. The next attempt
    waits in server selection for the monitor, so no pause is needed between attempts.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.admin.command(command)
        except AutoReconnect:
            if time.monotonic() >= deadline:
                raise


def wait_for_fail_point(client: Any, armed: dict[str, Any], times: int, timeout: float = 10.0) -> None:
    """Block until the fail point armed with reply ``armed`` has fired ``times`` times (``waitForFailPoint``)."""
    _admin_command(
        client,
        {
            "waitForFailPoint": "failCommand",
            "timesEntered": armed["count"] + times,
            "maxTimeMS": int(timeout * 1000),
        },
        timeout,
    )


def make_status(**values: Any) -> Any:
    """A :class:`ConsumerStatus` with plausible defaults, ``values`` overriding them."""
    from datetime import datetime, timezone

    from mongo_events.monitor.status import ConsumerStatus

    defaults: dict[str, Any] = {
        "id": "h:1:orders",
        "bus": "orders",
        "host": "h",
        "pid": 1,
        "status": "healthy",
        "state": "running",
        "namespace": "shop.orders",
        "checkpoint_key": "shop.orders::h",
        "heartbeat_at": datetime.now(timezone.utc),
        "interval": 5.0,
    }
    return ConsumerStatus(**{**defaults, **values})


def make_member(pid: int, partitions: tuple[int, ...], heartbeat_at: Any, **values: Any) -> Any:
    """The status of process ``pid`` of group ``billing`` (K = 4) holding ``partitions``."""
    defaults: dict[str, Any] = {"group": "billing", "partition_count": 4}
    return make_status(
        **{
            **defaults,
            "id": f"vm:{pid}:orders",
            "host": "vm",
            "pid": pid,
            "partitions": partitions,
            "heartbeat_at": heartbeat_at,
            **values,
        }
    )


def make_dispatcher(done: list[Any], **options: Any) -> Any:
    """A one-worker :class:`Dispatcher` whose finished slots are appended to ``done``; ``options``
    override its arguments (``gate``, ``lock``, ...). Nothing is decoded."""
    from mongo_events.dispatch import Dispatcher

    arguments: dict[str, Any] = {
        "max_workers": 1,
        "decoder": None,
        "middleware": (),
        "on_done": done.extend,
        "on_fatal": lambda exc: None,
        "dead_letters": None,
        "bus_name": "t",
        "lock": threading.RLock(),
    }
    return Dispatcher(**{**arguments, **options})


def change_event(n: int) -> me.ChangeEvent:
    """An insert of document 1 in ``d.c`` whose token is ``n``."""
    raw = {
        "_id": {"_data": f"{n:04d}"},
        "operationType": "insert",
        "ns": {"db": "d", "coll": "c"},
        "documentKey": {"_id": 1},
    }
    return me.ChangeEvent.from_raw(raw)
