"""Leases and fences across processes: the fake replica set and each member in its own process.

A member paused (SIGSTOP) past its lease wakes up to find its partition taken over: its fenced
checkpoint write is refused, it delivers nothing more, and the new owner's checkpoint stands.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest

from ..conftest import CLIENT_OPTIONS, wait_for

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP/SIGCONT are POSIX signals")

TTL = 1.0
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server_uri() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mongo_events.testing.server", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    uri = proc.stdout.readline().strip()
    try:
        yield uri
    finally:
        proc.terminate()
        proc.wait(10)


def _member(uri: str, name: str, log: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.groups.member_process", uri, name, str(TTL), str(log)],
        stdin=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _finish(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_a_paused_owner_is_fenced_out_and_delivers_nothing_more(server_uri: str, tmp_path: Path) -> None:
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(server_uri, **CLIENT_OPTIONS)
    tokens = client.db["_event_resume_tokens"]
    key = "g:db.orders#0"
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = _member(server_uri, "A", log_a)
    b: subprocess.Popen[str] | None = None
    try:
        assert wait_for(lambda: any(line.startswith("wrote") for line in _lines(log_a)), timeout=30), _lines(
            log_a
        )
        assert _lines(log_a)[0] == "assigned 0 1"
        os.kill(a.pid, signal.SIGSTOP)
        writes_before_pause = [line for line in _lines(log_a) if line.startswith("wrote")]

        b = _member(server_uri, "B", log_b)
        # B takes over only after A's lease expired on the server's clock, with the next fence.
        assert wait_for(lambda: "assigned 0 2" in _lines(log_b), timeout=30), _lines(log_b)
        assert wait_for(lambda: (tokens.find_one({"_id": key}) or {}).get("fence") == 2, timeout=30)

        os.kill(a.pid, signal.SIGCONT)
        assert wait_for(lambda: "revoked 0" in _lines(log_a), timeout=30), _lines(log_a)
        after = _lines(log_a)[len(writes_before_pause) + 1 :]
        # Not one write of A succeeded after the pause: each attempt was skipped by holds() or refused.
        assert not [line for line in after if line.startswith("wrote")], after
        doc = tokens.find_one({"_id": key})
        assert doc is not None and doc["fence"] == 2 and doc["token"]["_data"].startswith("B-")
        # B keeps writing; A never again.
        n = int(doc["token"]["_data"].split("-")[1])
        assert wait_for(
            lambda: int(tokens.find_one({"_id": key})["token"]["_data"].split("-")[1]) > n, timeout=30
        )
        assert tokens.find_one({"_id": key})["token"]["_data"].startswith("B-")
    finally:
        _finish(a)
        if b is not None:
            _finish(b)
        client.close()


def test_a_clean_stop_hands_over_at_once(server_uri: str, tmp_path: Path) -> None:
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = _member(server_uri, "A", log_a)
    b: subprocess.Popen[str] | None = None
    try:
        assert wait_for(lambda: "assigned 0 1" in _lines(log_a), timeout=30), _lines(log_a)
        b = _member(server_uri, "B", log_b)
        members = pymongo.MongoClient(server_uri, **CLIENT_OPTIONS).db["_event_leases"]
        assert wait_for(
            lambda: (
                members.count_documents({"_id": {"$regex": "^g:db.orders/members/"}, "owner": {"$ne": None}})
                == 2
            ),
            timeout=30,
        )
        heartbeats_seen = members.find_one({"_id": "g:db.orders#0"})
        assert (
            heartbeats_seen is not None and heartbeats_seen["fence"] == 1
        )  # active/standby: B waits, A keeps it
        assert _lines(log_b) == []
        members.database.client.close()
        _finish(a)
        assert _lines(log_a)[-2:] == ["revoked 0", "stopped"]
        # Released, not expired: B takes it at its next poll (ttl / 12), with the next fence.
        assert wait_for(lambda: "assigned 0 2" in _lines(log_b), timeout=30), _lines(log_b)
    finally:
        _finish(a)
        if b is not None:
            _finish(b)


def _owner_log(logs: dict[str, Path]) -> list[tuple[float, str, str, int]]:
    """(time, "assigned" | "revoked", member, partition), in time order, from every member's log."""
    entries = []
    for name, log in logs.items():
        for line in _lines(log):
            word, *rest = line.split()
            if word == "assigned":
                entries.append((float(rest[2]), word, name, int(rest[0])))
            elif word == "revoked":
                entries.append((float(rest[1]), word, name, int(rest[0])))
    return sorted(entries)


def _held(logs: dict[str, Path]) -> dict[str, set[int]]:
    held: dict[str, set[int]] = {name: set() for name in logs}
    for _, word, name, p in _owner_log(logs):
        (held[name].add if word == "assigned" else held[name].discard)(p)
    return held


#: How long a change of members may take to settle: a joiner is seen at the owners' next poll
#: (``TTL / 12``) and takes what they release at its own; a killed member's leases expire after
#: ``TTL`` on the server. A healthy run settles within about ``2 * TTL`` even on a loaded 2-core
#: CI runner; 30 ttls is generous, and a member that never gets its share (starved, or dead)
#: still fails it.
SETTLE = 30 * TTL


def _report(logs: dict[str, Path], procs: dict[str, subprocess.Popen[str]], started: float) -> str:
    """Why a wait failed: who owned what over time, which members are alive, their stderr."""
    lines = [f"held now: {_held(logs)}", "owner log (seconds since the first start):"]
    lines += [f"  {when - started:7.3f} {word:8} {name} {p}" for when, word, name, p in _owner_log(logs)]
    for name, proc in procs.items():
        code = proc.poll()
        lines.append(f"member {name}: " + ("running" if code is None else f"exited with {code}"))
        err = logs[name].with_suffix(".err")
        tail = err.read_text().splitlines()[-15:] if err.exists() else []
        lines += [f"  {name} stderr: {line}" for line in tail]
    return "\n".join(lines)


def test_three_members_share_six_partitions_and_survive_a_kill(server_uri: str, tmp_path: Path) -> None:
    """At most one live owner per partition at any moment (from the owner log), an even spread
    after every change, and a killed member's partitions taken over."""
    k = 6
    logs = {name: tmp_path / f"{name}.log" for name in ("A", "B", "C", "D")}
    started = time.time()
    procs = {name: _member_k(server_uri, name, logs[name], k) for name in ("A", "B", "C")}
    killed_at: dict[str, float] = {}

    def even(names: list[str]) -> Callable[[], bool]:
        def settled() -> bool:
            dead = [n for n in names if procs[n].poll() is not None]
            # A member that died cannot get its share: say so now, not after SETTLE.
            assert not dead, f"member(s) {dead} exited\n" + _report(logs, procs, started)
            return sorted(len(_held(logs)[n]) for n in names) == [k // len(names)] * len(names)

        return settled

    try:
        assert wait_for(even(["A", "B", "C"]), timeout=SETTLE), _report(logs, procs, started)
        procs["B"].kill()
        procs["B"].wait(10)
        killed_at["B"] = time.time()
        assert wait_for(even(["A", "C"]), timeout=SETTLE), _report(logs, procs, started)
        procs["D"] = _member_k(server_uri, "D", logs["D"], k)
        assert wait_for(even(["A", "C", "D"]), timeout=SETTLE), _report(logs, procs, started)
    finally:
        for proc in procs.values():
            _finish(proc)
    # Replay the owner log: a partition is taken only when nobody holds it (a killed member holds
    # nothing after its kill; its leases expire on the server before anyone else can take them).
    owner: dict[int, str | None] = dict.fromkeys(range(k))
    for when, word, name, p in _owner_log(logs):
        for dead, at in killed_at.items():
            if at <= when:
                owner = {q: (None if o == dead else o) for q, o in owner.items()}
        if word == "assigned":
            assert owner[p] is None, f"partition {p} assigned to {name} while {owner[p]} held it"
            owner[p] = name
        else:
            assert owner[p] == name
            owner[p] = None


def _member_k(uri: str, name: str, log: Path, partitions: int) -> subprocess.Popen[str]:
    """A member of ``partitions``; its stderr (the library's warnings, a traceback) goes to
    ``<log>.err`` for :func:`_report`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.with_suffix(".err").open("w") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.groups.member_process",
                uri,
                name,
                str(TTL),
                str(log),
                str(partitions),
            ],
            stdin=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=ROOT,
            env=env,
        )
