"""The mongo-events command line against the fake replica set."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any

import pymongo
import pytest
from bson import json_util

import mongo_events as me
from mongo_events.cli import main
from mongo_events.monitor import MongoMonitorStore, MonitorEntry, MonitorStatus
from mongo_events.testing import FakeReplicaSet

from .helpers import stop_gracefully
from .test_examples import ROOT


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[Any], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, [json_util.loads(line) for line in out.splitlines() if line.strip()], err


def test_tail_prints_relaxed_extended_json_and_resumes(fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], capsys: pytest.CaptureFixture[str]) -> None:
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.wait(0.05):
            client.shop.orders.insert_one({"_id": i, "at": datetime(2026, 1, 1, tzinfo=timezone.utc)})
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        code = main([
            "tail", fake_rs.uri, "--db", "shop", "--collection", "orders", "--resume-id", "cli",
            "--pipeline", '[{"$match": {"operationType": "insert"}}]', "--limit", "2",
        ])
    finally:
        stop.set()
        thread.join()
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    first = json.loads(lines[0])
    assert first["operation_type"] == "insert" and first["full_document"]["at"] == {"$date": "2026-01-01T00:00:00Z"}
    assert "tailing shop.orders as shop.orders:cli" in err
    # The position was stored under the id: a second tail resumes after the first one's changes.
    assert client.shop["_event_resume_tokens"].find_one({"_id": "shop.orders:cli"}) is not None
    code = main(["tail", fake_rs.uri, "--db", "shop", "--collection", "orders", "--resume-id", "cli", "--limit", "1"])
    out, _ = capsys.readouterr()
    assert code == 0 and json.loads(out)["document_key"]["_id"] == first["document_key"]["_id"] + 2


def test_tail_rejects_a_bad_pipeline(fake_rs: FakeReplicaSet, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tail", fake_rs.uri, "--db", "shop", "--pipeline", "{not json"]) == 2
    assert "--pipeline is not JSON" in capsys.readouterr().err


def test_tokens_show_and_reset(fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], capsys: pytest.CaptureFixture[str]) -> None:
    store = me.MongoResumeTokenStore(client.shop["_event_resume_tokens"])
    store.save("shop.orders:a", {"_data": "82AA"})
    store.save("shop.orders:b", {"_data": "82BB"})
    code, docs, _ = run(capsys, "tokens", "show", "--uri", fake_rs.uri, "--db", "shop")
    assert code == 0 and [d["key"] for d in docs] == ["shop.orders:a", "shop.orders:b"]
    assert docs[0]["token"] == {"_data": "82AA"}
    code, _, err = run(capsys, "tokens", "reset", "--uri", fake_rs.uri, "--db", "shop", "--key", "shop.orders:a")
    assert code == 2 and "--yes" in err
    code, _, _ = run(capsys, "tokens", "reset", "--uri", fake_rs.uri, "--db", "shop", "--key", "shop.orders:a", "--yes")
    assert code == 0 and store.load("shop.orders:a") is None and store.load("shop.orders:b") is not None
    code, _, err = run(capsys, "tokens", "show", "--uri", fake_rs.uri, "--db", "shop", "--key", "shop.orders:a")
    assert code == 4 and "no resume token" in err


def test_acks_stats_and_list(fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], capsys: pytest.CaptureFixture[str]) -> None:
    store = me.MongoAckStore(client.internal["_event_acks"])
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    store.write([me.AckRecord("e1", t0), me.AckRecord("e2", t0 + timedelta(minutes=1), t0 + timedelta(minutes=2)), me.AckRecord("e3", t0 + timedelta(minutes=3))])
    code, (stats,), _ = run(capsys, "acks", "stats", "--uri", fake_rs.uri, "--db", "internal")
    assert code == 0 and (stats["pending"], stats["acked"], stats["total"]) == (2, 1, 3)
    assert stats["oldest_pending"] == t0.replace(tzinfo=None)
    code, docs, _ = run(capsys, "acks", "list", "--uri", fake_rs.uri, "--db", "internal", "--status", "pending", "--since", "2026-01-01T00:02:00Z")
    assert code == 0 and [d["event_id"] for d in docs] == ["e3"]


def _letter(store: me.MongoDeadLetterStore, original: str, event: str = "orders") -> str:
    return store.store(me.DeadLetter(
        id=original + "-dl", event_name=event, original_id=original,
        payload={"_id": {"_data": "82" + "0" * 16}, "operationType": "insert", "ns": {"db": "shop", "coll": "orders"}, "documentKey": {"_id": 1}},
        metadata={}, error="RuntimeError: bug", retry_count=3, source="bus", created_at=datetime.now(timezone.utc),
    ))


def test_dlq_list_show_delete_cleanup_stats(fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], capsys: pytest.CaptureFixture[str]) -> None:
    store = me.MongoDeadLetterStore(client.internal["event_dlq"])
    first = _letter(store, "ev1")
    _letter(store, "ev2", event="users")
    base = ["--uri", fake_rs.uri, "--db", "internal"]
    code, docs, _ = run(capsys, "dlq", "list", *base, "--event", "orders")
    assert code == 0 and [d["original_id"] for d in docs] == ["ev1"] and "payload" not in docs[0]
    code, (doc,), _ = run(capsys, "dlq", "show", first, *base)
    assert code == 0 and doc["payload"]["operationType"] == "insert"
    code, (stats,), _ = run(capsys, "dlq", "stats", *base)
    assert stats["total"] == 2 and stats["by_event"] == {"orders": 1, "users": 1}
    assert run(capsys, "dlq", "show", "missing", *base)[0] == 4
    assert run(capsys, "dlq", "delete", first, *base)[0] == 0
    assert run(capsys, "dlq", "delete", first, *base)[0] == 4
    code, _, err = run(capsys, "dlq", "cleanup", *base, "--older-than", "0s")
    assert code == 0 and "deleted 1 dead letters" in err


def test_dlq_replay_through_the_apps_bus(fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], capsys: pytest.CaptureFixture[str], tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = me.MongoDeadLetterStore(client.internal["event_dlq"])
    _letter(store, "ev1")
    _letter(store, "ev2", event="broken")
    (tmp_path / "cli_app.py").write_text(
        "import pymongo, mongo_events as me\n"
        f"bus = me.Bus(pymongo.MongoClient({fake_rs.uri!r}).shop.orders)\n"
        "handled = []\n"
        "bus.subscribe(name='orders')(lambda ev: handled.append(ev.id))\n"
        "@bus.subscribe(name='broken')\n"
        "def broken(ev):\n    raise RuntimeError('still broken')\n"
    )
    monkeypatch.chdir(tmp_path)
    base = ["--uri", fake_rs.uri, "--db", "internal", "--app", "cli_app:bus"]
    code, (result,), _ = run(capsys, "dlq", "replay", *base, "--event", "orders")
    assert code == 0 and result["replayed"] == 1
    code, (result,), _ = run(capsys, "dlq", "replay", *base)
    assert code == 1 and result["failed"] == 1  # the broken one; the replayed one is excluded
    assert run(capsys, "dlq", "replay", "--uri", fake_rs.uri, "--db", "internal", "--app", "nowhere:bus")[0] == 2


def test_store_commands_need_a_uri(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MONGODB_URI", raising=False)
    code, _, err = run(capsys, "acks", "stats", "--db", "x")
    assert code == 2 and "MONGODB_URI" in err


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["acks", "list", "--db", "x", "--since", "yesterday"])
    assert exc.value.code == 2 and "not an ISO 8601 time" in capsys.readouterr().err


def test_monitor_serve_answers_http_and_stops_on_sigterm(fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any]) -> None:
    MongoMonitorStore(client.internal).write([
        MonitorEntry("e1", "orders", "shop.orders", "bus", MonitorStatus.COMPLETED, datetime.now(timezone.utc)),
    ])
    env = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mongo_events", "monitor", "serve", "--uri", fake_rs.uri, "--db", "internal", "--port", "0"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        port = re.search(r":(\d+)/v1/monitor/entries", line)
        assert port, line
        with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/v1/monitor/entries/count", timeout=10) as resp:
            assert json.loads(resp.read()) == {"count": 1}
        assert stop_gracefully(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
