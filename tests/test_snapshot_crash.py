"""Crash safety of the initial snapshot: SIGKILL mid-scan, five times, with restarts (issue 21)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from typing import Any

import pymongo

import mongo_events as me
from mongo_events.snapshot import parse_progress

from .conftest import wait_for
from .crash.harness import ROOT, _start_server
from .crash.snapshot import KEY

DOCS = 3000
KILLS = 5
MAX_IN_FLIGHT = 50


def _worker(uri: str, log: str, run: int, expect: int = 0) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "tests.crash.snapshot", "--uri", uri, "--log", log, "--run", str(run)]
    command += ["--max-in-flight", str(MAX_IN_FLIGHT), "--batch-size", "40", "--expect", str(expect)]
    return subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE)


def _read_log(path: str) -> list[tuple[int, int]]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [(int(a), int(b)) for a, b in (line.split() for line in fh if len(line.split()) == 2)]


def test_a_snapshot_killed_five_times_mid_scan_resumes_where_it_was_and_loses_nothing() -> None:
    seed = int(os.environ.get("SNAPSHOT_CRASH_SEED", "0")) or random.randrange(2**32)
    rng = random.Random(seed)
    context = f"seed={seed} (rerun with SNAPSHOT_CRASH_SEED={seed})"
    # One kill point in each fifth of the scan, counted in distinct documents handled.
    span = (DOCS - 400) // KILLS
    targets = [200 + k * span + rng.randrange(span - 50) for k in range(KILLS)]
    jitter = threading.Event()  # never set: its timed wait moves each kill off the log line that allowed it
    with tempfile.TemporaryDirectory() as tmp:
        server, uri = _start_server(os.path.join(tmp, "data"))
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10000)
        log = os.path.join(tmp, "handled.log")
        errors: list[str] = []
        try:
            client["crash"]["docs"].insert_many([{"_id": i, "pad": "x" * 100} for i in range(DOCS)])
            tokens = client["crash"]["_event_resume_tokens"]
            store = me.MongoResumeTokenStore(tokens)
            afters: list[int] = []  # the stored progress (last finished _id) right after each kill
            log_lengths: list[int] = []  # how many log lines existed at that moment
            for run, target in enumerate(targets, 1):
                proc = _worker(uri, log, run)
                reached = wait_for(
                    lambda t=target: len({d for _, d in _read_log(log)}) >= t or proc.poll() is not None,  # type: ignore[misc]
                    timeout=30,
                    interval=0.005,
                )
                jitter.wait(rng.uniform(0, 0.05))
                proc.kill()
                _, err = proc.communicate(timeout=10)
                errors.append(err.decode()[-2000:])
                assert reached and proc.returncode == -9, (
                    f"{context}: run {run} did not reach {target} documents or exited by itself "
                    f"({proc.returncode}):\n{errors[-1]}"
                )
                doc = tokens.find_one({"_id": KEY})
                checkpoint = store.load(KEY)
                progress = parse_progress(checkpoint.token) if checkpoint is not None else None
                entries = _read_log(log)
                # Every kill landed mid-scan, after the checkpoint recorded some progress.
                assert progress is not None and progress.has_after, (context, run, doc)
                assert (
                    doc is not None and doc["token"] == progress.start
                )  # a real token (T0), progress beside it
                afters.append(progress.after)
                log_lengths.append(len(entries))
                # The checkpoint never passes a document that was not handled yet.
                unhandled = set(range(progress.after + 1)) - {d for _, d in entries}
                assert not unhandled, (
                    f"{context}: run {run}: checkpoint after {progress.after} passed {sorted(unhandled)[:5]}"
                )

            final = _worker(uri, log, KILLS + 1, expect=DOCS)
            try:
                _, err = final.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                final.kill()
                _, err = final.communicate(timeout=10)
            errors.append(err.decode()[-2000:])
            assert final.returncode == 0, f"{context}: the final run exited {final.returncode}:\n{errors[-1]}"

            entries = _read_log(log)
            assert {d for _, d in entries} == set(range(DOCS)), context  # every document, at least once
            # Cross-process resume: each restart reads only after the progress stored before it,
            # so the snapshot never starts again from the first _id once it has passed it.
            # (A run killed at once, its target already passed by the run before, reads nothing.)
            restarts_that_read = 0
            for run, after in enumerate(afters, 2):
                read = [d for r, d in entries if r == run]
                if read:
                    restarts_that_read += 1
                    assert min(read) > after, f"{context}: run {run} read {min(read)} <= stored {after}"
            assert restarts_that_read >= 2, (context, afters)
            assert afters == sorted(afters) and afters[0] < afters[-1], (context, afters)
            # Redelivery per restart: documents a run handled that an earlier run had handled.
            seen: set[int] = set()
            redelivered: Counter[int] = Counter()
            for r, d in entries:
                if d in seen:
                    redelivered[r] += 1
                seen.add(d)
            assert max(redelivered.values(), default=0) <= MAX_IN_FLIGHT, (context, dict(redelivered))
            last = store.load(KEY)  # the checkpoint ends at the stream
            assert last is not None and parse_progress(last.token) is None, context
        except AssertionError:
            print(f"{context}\n" + "\n".join(f"--- run {i + 1}:\n{e}" for i, e in enumerate(errors)))
            raise
        finally:
            client.close()
            server.terminate()
            server.wait(10)
