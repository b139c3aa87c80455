"""The crash harness: kill a consumer at random moments while a writer runs, then check.

Invariants, checked from durable evidence:

1. every change is handled at least once, in the end;
2. no stored checkpoint ever points past a change that was not yet handled
   (checked right after each kill, against the handler's fsynced log);
3. each restart redelivers at most ``max_in_flight`` changes.
"""

from __future__ import annotations

import argparse
import os
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pymongo
from bson.timestamp import Timestamp

from mongo_events.testing.oplog import parse_token

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Report:
    seed: int
    kills: int = 0
    changes: int = 0
    checkpoints_checked: int = 0
    max_redelivered: int = 0
    duplicates: int = 0
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        status = "OK" if not self.problems else f"{len(self.problems)} problem(s): {self.problems[:5]}"
        return (
            f"seed={self.seed} kills={self.kills} changes={self.changes} checkpoints_checked={self.checkpoints_checked} "
            f"duplicates={self.duplicates} max_redelivered_per_restart={self.max_redelivered}: {status}"
        )


def _start_server(data_dir: str, port: int = 0) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mongo_events.testing.server", "--port", str(port), "--data-dir", data_dir],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    uri = proc.stdout.readline().strip()
    if not uri:
        raise RuntimeError("the fake replica set did not start")
    return proc, uri


def _consumer(uri: str, log: str, run: int, max_in_flight: int, expect: int = 0) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.crash.consumer",
            "--uri",
            uri,
            "--log",
            log,
            "--run",
            str(run),
            "--max-in-flight",
            str(max_in_flight),
            "--expect",
            str(expect),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def _wait_ready(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait (at most ``timeout`` s) for the consumer's ``ready`` line: its bus has started."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return False
    return proc.stdout.readline().strip() == b"ready"


def _read_log(path: str) -> list[tuple[int, str]]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        out = []
        for line in fh:
            parts = line.split()
            if len(parts) == 2:
                out.append((int(parts[0]), parts[1]))
        return out


def run(kills: int = 20, changes: int = 2000, seed: int | None = None, max_in_flight: int = 50) -> Report:
    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    report = Report(seed=seed, changes=changes)
    with tempfile.TemporaryDirectory() as tmp:
        server, uri = _start_server(os.path.join(tmp, "data"))
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10000)
        coll = client["crash"]["orders"]
        tokens = client["crash"]["_event_resume_tokens"]
        log = os.path.join(tmp, "handled.log")
        writer_done = threading.Event()
        pace = threading.Event()  # never set: its timed wait paces the writer

        def write() -> None:
            interval = max(0.0005, 0.5 * kills / changes)  # spread the writes across the kills
            for i in range(changes):
                coll.insert_one({"_id": f"c{i:06d}"})
                pace.wait(interval * rng.random() * 2)
            writer_done.set()

        checkpoints: list[tuple[Timestamp, int]] = []  # (checkpoint time, log length at that moment)
        writer = threading.Thread(target=write, name="crash-writer", daemon=True)
        writer.start()
        runs = 0
        try:
            while runs < kills or not writer_done.is_set():
                runs += 1
                proc = _consumer(uri, log, runs, max_in_flight)
                # Most kills land while the bus runs, timed from its start; one in five while
                # it starts. (Timed from the spawn alone, a loaded machine, importing slowly,
                # saw every kill before the first checkpoint.)
                if rng.random() < 0.8:
                    _wait_ready(proc, 30.0)
                try:
                    proc.wait(timeout=rng.uniform(0.05, 1.2))
                    report.problems.append(f"run {runs}: consumer exited by itself with {proc.returncode}")
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                report.kills += 1
                doc = tokens.find_one({"_id": "crash.orders:crash"})
                if doc is not None:
                    checkpoints.append((parse_token(doc["token"])[0], len(_read_log(log))))
            runs += 1
            final = _consumer(uri, log, runs, max_in_flight, expect=changes)
            if final.wait(timeout=180) != 0:
                report.problems.append(f"final consumer exited with {final.returncode}")
            writer.join(60)

            # When did each change happen? Read the oplog through a change stream.
            when: dict[str, Timestamp] = {}
            with coll.watch(start_at_operation_time=Timestamp(1, 0), max_await_time_ms=100) as stream:
                while len(when) < changes:
                    ev = stream.try_next()
                    if ev is None:
                        break
                    if ev["operationType"] == "insert":
                        when[ev["documentKey"]["_id"]] = ev["clusterTime"]
            if len(when) != changes:
                report.problems.append(f"the oplog shows {len(when)} inserts, expected {changes}")
            entries = _read_log(log)
            for cp_time, log_len in checkpoints:
                handled_then = {key for _, key in entries[:log_len]}
                behind = [k for k, ts in when.items() if ts <= cp_time and k not in handled_then]
                if behind:
                    report.problems.append(
                        f"checkpoint {cp_time} passed {len(behind)} unhandled change(s), e.g. {behind[:3]}"
                    )
                report.checkpoints_checked += 1
            missing = set(when) - {key for _, key in entries}
            if missing:
                report.problems.append(f"{len(missing)} change(s) never handled, e.g. {sorted(missing)[:3]}")
            seen: set[str] = set()
            per_run: Counter[int] = Counter()
            for run_no, key in entries:
                if key in seen:
                    per_run[run_no] += 1
                    report.duplicates += 1
                seen.add(key)
            report.max_redelivered = max(per_run.values(), default=0)
            if report.max_redelivered > max_in_flight:
                report.problems.append(
                    f"a restart redelivered {report.max_redelivered} > max_in_flight={max_in_flight}"
                )
        finally:
            client.close()
            server.terminate()
            server.wait(10)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Kill a consumer at random moments and check nothing is lost."
    )
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=50000)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-in-flight", type=int, default=50)
    args = parser.parse_args(argv)
    report = run(args.kills, args.changes, args.seed, args.max_in_flight)
    print(report)
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
