"""Poison events: a change whose handler kills the process is dead-lettered after max_crashes restarts."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from typing import Any

import bson
import pymongo
import pytest

from .crash.harness import ROOT, _start_server


def _consumer(uri: str, log: str, run: int, expect: int, mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.crash.poison",
            "--uri",
            uri,
            "--log",
            log,
            "--run",
            str(run),
            "--expect",
            str(expect),
            "--deadline",
            "30",
            "--mode",
            mode,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("mode", ["idempotency", "crash_store"])
def test_an_event_that_kills_the_process_is_dead_lettered_after_three_restarts(mode: str) -> None:
    seed = int(os.environ.get("POISON_SEED", "0")) or random.randrange(2**32)
    rng = random.Random(seed)
    n = rng.randint(5, 20)
    ids = [f"c{i:03d}" for i in range(n)]
    ids.insert(rng.randrange(n + 1), "poison")
    exits: list[int] = []
    errs: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        server, uri = _start_server(os.path.join(tmp, "data"))
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10000)
        try:
            client["poison"]["orders"].insert_many([{"_id": i} for i in ids])
            log = os.path.join(tmp, "handled.log")
            for run in range(1, 7):  # bounded: 3 crashes, then the run that dead-letters it
                proc = _consumer(uri, log, run, expect=n, mode=mode)
                try:
                    _, err = proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, err = proc.communicate(timeout=10)
                exits.append(proc.returncode)
                errs.append(err.decode()[-2000:])
                if proc.returncode not in (0, 1):
                    raise AssertionError(
                        f"{mode}: seed={seed}: run {run} exited {proc.returncode}:\n{err.decode()[-3000:]}"
                    )
                if proc.returncode == 0:
                    break
            context = f"{mode}: seed={seed} (rerun with POISON_SEED={seed}); exits={exits}"
            # three crashes, then it is dead-lettered
            assert exits == [1, 1, 1, 0], context + "\n" + "\n".join(errs)
            with open(log) as fh:
                handled = {line.split()[1] for line in fh}
            assert handled == set(ids) - {"poison"}, context  # the others are all handled
            letters = list(client["poison_internal"]["event_dlq"].find())
            assert len(letters) == 1, (
                context,
                [(bson.decode(x["payload"]).get("documentKey"), x["error"]) for x in letters],
            )
            (letter,) = letters
            assert letter["event_name"] == "handle" and bson.decode(letter["payload"])[
                "documentKey"
            ] == {  # Go's binary payload
                "_id": "poison"
            }, context
            assert "crashed the process 3 times" in letter["error"], (context, letter["error"])
            # A checkpoint was stored and nothing stays claimed (events after the poison one were handled above).
            assert (
                client["poison"]["_event_resume_tokens"].find_one({"_id": "poison.orders:poison"}) is not None
            ), context
            assert (
                client["poison_internal"]["event_idempotency"].count_documents(
                    # A start that ran uncounted beside a dead process's claim leaves that claim to
                    # expire (CRASH_LEASE is 50 ms here): only a claim still live is held.
                    {"status": "processing", "claimed_until": {"$gt": datetime.now(timezone.utc)}}
                )
                == 0
            ), context
        finally:
            client.close()
            server.terminate()
            server.wait(10)
