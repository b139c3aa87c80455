"""3 consumer processes and 1 publisher on the fake replica set (its own process); a consumer is
SIGKILLed twice (1,000 messages by default; QUEUE_TEST_COUNT=5000 for the full run). Every message is handled at least once, none stays in flight after the
visibility timeout, and each key's messages are handled in publish order."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

import pymongo

from ..conftest import wait_for
from ..crash.harness import ROOT, _start_server

COUNT = int(os.environ.get("QUEUE_TEST_COUNT", "1000"))
KEYS = 50
#: Every wait grows with COUNT: the fake (mongomock) scans the whole collection per query.
BOUND = 60 + COUNT * 0.1


def _worker(uri: str, errors: str, *args: str) -> subprocess.Popen[str]:
    """A worker process; its stderr goes to the file ``errors`` (a pipe nobody reads could fill and block it)."""
    with open(errors, "a") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.crash.queue_worker", *args, "--uri", uri, "--keys", str(KEYS)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )


def _read(path: str) -> list[tuple[str, int, str]]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [(p[0], int(p[1]), p[2]) for p in (line.split() for line in fh) if len(p) == 3]


def test_three_consumers_one_publisher_two_sigkills() -> None:
    seed = int(os.environ.get("QUEUE_SEED", "0")) or random.randrange(2**32)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        server, uri = _start_server(os.path.join(tmp, "data"))
        log = os.path.join(tmp, "handled.log")
        errors = os.path.join(tmp, "stderr.log")

        def stderr() -> str:
            with open(errors) as fh:
                return fh.read()[-3000:]

        consumers: dict[str, subprocess.Popen[str]] = {}
        killed: list[str] = []
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10000)
        try:

            def start(name: str) -> None:
                proc = _worker(uri, errors, "consume", "--log", log, "--name", name)
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", f"seed={seed}"
                consumers[name] = proc

            for name in ("a", "b", "c"):
                start(name)
            publisher = _worker(uri, errors, "publish", "--count", str(COUNT))
            for round_ in range(2):
                # Let some work happen, then SIGKILL a consumer mid-stream and start a new one.
                target = (round_ + 1) * COUNT // 4
                assert wait_for(lambda t=target: len(_read(log)) >= t, BOUND), (
                    f"seed={seed}: stalled before kill {round_}"
                )
                victim = rng.choice(sorted(consumers))
                consumers[victim].send_signal(signal.SIGKILL)
                consumers[victim].wait(10)
                killed.append(victim)
                start(f"{victim}{round_}")
                del consumers[victim]
            assert publisher.wait(BOUND) == 0, f"seed={seed}: publisher failed: {stderr()}"

            def all_handled() -> bool:
                return len({n for _, n, _ in _read(log)}) >= COUNT

            assert wait_for(all_handled, BOUND, 0.1), (
                f"seed={seed}: {len({n for _, n, _ in _read(log)})} of {COUNT} handled"
            )
            coll = client["jobs"]["messages"]
            # None stuck in flight: the killed consumers' claims expire (2 s) and are handled by others.
            assert wait_for(lambda: coll.count_documents({"status": "acked"}) == COUNT, 30, 0.1), (
                f"seed={seed}: {coll.count_documents({'status': {'$ne': 'acked'}})} not acked"
            )
            assert coll.count_documents({"status": "inflight"}) == 0
            entries = _read(log)
            handled = {n for _, n, _ in entries}
            assert handled == set(range(COUNT)), f"seed={seed}"
            per_key: dict[str, list[int]] = defaultdict(list)
            for _, n, key in entries:
                per_key[key].append(n)
            for key, ns in per_key.items():
                assert ns == sorted(ns), f"seed={seed}: key {key} out of order: {ns[:20]}"
            assert len({name for name, _, _ in entries}) >= 3, f"seed={seed}: work was not shared"
            # run_forever() ends on SIGTERM with a clean stop (exit status 0).
            for name, proc in consumers.items():
                proc.terminate()
                assert proc.wait(20) == 0, f"seed={seed}: consumer {name}: {stderr()}"
            print(f"seed={seed} handled={len(entries)} unique={len(handled)} killed={killed}")
        finally:
            for proc in consumers.values():
                proc.terminate()
            deadline = time.monotonic() + 20
            for proc in consumers.values():
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            client.close()
            server.terminate()
            server.wait(10)
