"""Crash safety: consumers killed with SIGKILL, and the server killed under a running bus."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

import pymongo
import pytest

import mongo_events as me

from .crash.harness import ROOT, _start_server, run
from .helpers import Recorder


def test_consumer_killed_at_random_moments_loses_nothing() -> None:
    seed = int(os.environ.get("CRASH_SEED", "0")) or None
    report = run(kills=20, changes=2000, seed=seed, max_in_flight=50)
    print(report)
    assert not report.problems, f"{report} (rerun with CRASH_SEED={report.seed})"
    assert report.kills >= 20
    assert report.checkpoints_checked >= 10, f"too few checkpoints to check: {report}"


def test_server_killed_and_restarted_under_a_running_bus() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        server, uri = _start_server(data)
        port = int(uri.split(":")[2].split("/")[0])
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(
            uri, serverSelectionTimeoutMS=20000, heartbeatFrequencyMS=500
        )
        rec = Recorder()
        bus = me.Bus(client.shop.orders, max_await_time=0.05, flush_interval=0.05)
        bus.subscribe(lambda ev: rec.add(ev.document_id))
        bus.start()
        try:
            client.shop.orders.insert_many([{"_id": i} for i in range(10)])
            rec.wait(10)
            server.send_signal(signal.SIGKILL)  # a crash, as the driver sees a failover
            server.wait()
            server, _ = _start_server(data, port)
            client.shop.orders.insert_many([{"_id": i} for i in range(10, 20)])
            got = rec.wait(20, timeout=60)
            assert sorted(set(got)) == list(range(20))
            assert bus.state is me.BusState.RUNNING
        finally:
            bus.stop(timeout=10)
            client.close()
            server.terminate()
            server.wait(10)


@pytest.mark.parametrize("script", ["tests.crash"])
def test_the_long_crash_script_runs(script: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", script, "--kills", "3", "--changes", "100", "--seed", "7"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "seed=7" in result.stdout and ": OK" in result.stdout
