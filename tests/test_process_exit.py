"""The one shutdown mechanism at interpreter exit (see mongo_events.dispatch, "Shutdown").

The workers are daemon threads left out of concurrent.futures' exit-time join; nothing
else halts them at exit. So a process whose bus was never stopped, with one callback
blocked for good and the other workers idle, still exits, and says what it lost.
"""

from __future__ import annotations

from typing import Any

import pymongo

from mongo_events.testing import FakeReplicaSet

from .test_shutdown import _child, _finish, _Lines

_NEVER_STOPPED = """
import logging, sys, threading
import pymongo
import mongo_events as me

logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(message)s")
client = pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=5000)
entered = threading.Event()

def forever(ev):
    entered.set()
    threading.Event().wait()  # never returns

bus = me.Bus(client.shop.orders, name="never-stopped", resume=False, max_workers=4, max_await_time=0.05)
bus.subscribe(forever)
bus.start()
print("started", flush=True)
assert entered.wait(30), "the callback never ran"
print("leaving", flush=True)
"""


def test_a_process_exits_when_its_bus_was_never_stopped_and_a_callback_blocks(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any]
) -> None:
    proc = _child(_NEVER_STOPPED, fake_rs.uri)
    out = _Lines(proc.stdout)
    out.wait_for("started")
    client.shop.orders.insert_one({"_id": 1})
    out.wait_for("leaving")
    code = _finish(proc, 30, "the process did not exit: a worker (busy or idle) held the interpreter's exit")
    stderr = proc.stderr.read() if proc.stderr else ""
    assert code == 0, stderr
    # The exit hook only says what is lost: the bus wrote no final checkpoint.
    assert "interpreter exiting while bus never-stopped still runs" in stderr
