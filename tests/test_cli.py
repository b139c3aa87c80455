"""The mongo-events command line against the fake replica set."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import urllib.error
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


def test_tail_prints_relaxed_extended_json_and_resumes(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.wait(0.05):
            client.shop.orders.insert_one({"_id": i, "at": datetime(2026, 1, 1, tzinfo=timezone.utc)})
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        code = main(
            [
                "tail",
                fake_rs.uri,
                "--db",
                "shop",
                "--collection",
                "orders",
                "--resume-id",
                "cli",
                "--pipeline",
                '[{"$match": {"operationType": "insert"}}]',
                "--limit",
                "2",
            ]
        )
    finally:
        stop.set()
        thread.join()
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    first = json.loads(lines[0])
    assert first["operation_type"] == "insert" and first["full_document"]["at"] == {
        "$date": "2026-01-01T00:00:00Z"
    }
    assert "tailing shop.orders as shop.orders:cli" in err
    # The position was stored under the id: a second tail resumes after the first one's changes.
    assert client.shop["_event_resume_tokens"].find_one({"_id": "shop.orders:cli"}) is not None
    code = main(
        ["tail", fake_rs.uri, "--db", "shop", "--collection", "orders", "--resume-id", "cli", "--limit", "1"]
    )
    out, _ = capsys.readouterr()
    assert code == 0 and json.loads(out)["document_key"]["_id"] == first["document_key"]["_id"] + 2


def test_tail_rejects_a_bad_pipeline(fake_rs: FakeReplicaSet, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tail", fake_rs.uri, "--db", "shop", "--pipeline", "{not json"]) == 2
    assert "--pipeline is not JSON" in capsys.readouterr().err


def test_tokens_show_and_reset(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    store = me.MongoResumeTokenStore(client.shop["_event_resume_tokens"])
    store.save("shop.orders:a", {"_data": "82AA"})
    store.save("shop.orders:b", {"_data": "82BB"})
    code, docs, _ = run(capsys, "tokens", "show", "--uri", fake_rs.uri, "--db", "shop")
    assert code == 0 and [d["key"] for d in docs] == ["shop.orders:a", "shop.orders:b"]
    assert docs[0]["token"] == {"_data": "82AA"}
    code, _, err = run(
        capsys, "tokens", "reset", "--uri", fake_rs.uri, "--db", "shop", "--key", "shop.orders:a"
    )
    assert code == 2 and "--yes" in err
    code, _, _ = run(
        capsys, "tokens", "reset", "--uri", fake_rs.uri, "--db", "shop", "--key", "shop.orders:a", "--yes"
    )
    assert code == 0 and store.load("shop.orders:a") is None and store.load("shop.orders:b") is not None
    code, _, err = run(
        capsys, "tokens", "show", "--uri", fake_rs.uri, "--db", "shop", "--key", "shop.orders:a"
    )
    assert code == 4 and "no resume token" in err


def test_acks_stats_and_list(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    store = me.MongoAckStore(client.internal["_event_acks"])
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    store.write(
        [
            me.AckRecord("e1", t0),
            me.AckRecord("e2", t0 + timedelta(minutes=1), t0 + timedelta(minutes=2)),
            me.AckRecord("e3", t0 + timedelta(minutes=3)),
        ]
    )
    code, (stats,), _ = run(capsys, "acks", "stats", "--uri", fake_rs.uri, "--db", "internal")
    assert code == 0 and (stats["pending"], stats["acked"], stats["total"]) == (2, 1, 3)
    assert stats["oldest_pending"] == t0.replace(tzinfo=None)
    code, docs, _ = run(
        capsys,
        "acks",
        "list",
        "--uri",
        fake_rs.uri,
        "--db",
        "internal",
        "--status",
        "pending",
        "--since",
        "2026-01-01T00:02:00Z",
    )
    assert code == 0 and [d["event_id"] for d in docs] == ["e3"]


def _letter(store: me.MongoDeadLetterStore, original: str, event: str = "orders") -> str:
    return store.store(
        me.DeadLetter(
            id=original + "-dl",
            event_name=event,
            original_id=original,
            payload={
                "_id": {"_data": "82" + "0" * 16},
                "operationType": "insert",
                "ns": {"db": "shop", "coll": "orders"},
                "documentKey": {"_id": 1},
            },
            metadata={},
            error="RuntimeError: bug",
            retry_count=3,
            source="bus",
            created_at=datetime.now(timezone.utc),
        )
    )


def test_dlq_list_show_delete_cleanup_stats(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], capsys: pytest.CaptureFixture[str]
) -> None:
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
    code, _, err = run(capsys, "dlq", "delete", first, *base)
    assert code == 2 and "never replayed" in err and "--yes" in err
    assert run(capsys, "dlq", "delete", first, *base, "--yes")[0] == 0
    assert run(capsys, "dlq", "delete", first, *base, "--yes")[0] == 4
    code, _, err = run(capsys, "dlq", "cleanup", *base, "--older-than", "0s")
    assert code == 2 and "1 of the 1 dead letters older than 0s were never replayed" in err
    code, docs, err = run(capsys, "dlq", "cleanup", *base, "--older-than", "0s", "--dry-run")
    assert code == 0 and [d["original_id"] for d in docs] == ["ev2"] and "would delete 1 dead letters" in err
    code, _, err = run(capsys, "dlq", "cleanup", *base, "--older-than", "30d", "--yes")
    assert code == 0 and "deleted 0 dead letters older than 30d" in err  # not "30 days, 0:00:00"
    code, _, err = run(capsys, "dlq", "cleanup", *base, "--older-than", "0s", "--yes")
    assert code == 0 and "deleted 1 dead letters older than 0s" in err


def test_dlq_replay_through_the_apps_bus(
    fake_rs: FakeReplicaSet,
    client: pymongo.MongoClient[Any],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
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
    code, (result,), err = run(capsys, "dlq", "replay", *base)
    assert code == 1 and result["failed"] == 1  # the broken one; the replayed one is excluded
    assert "replay of ev2-dl failed: RuntimeError('still broken')" in err
    assert "replayed 0 of 1 dead letters: 1 failed" in err
    assert (
        run(capsys, "dlq", "replay", "--uri", fake_rs.uri, "--db", "internal", "--app", "nowhere:bus")[0] == 2
    )


def test_store_commands_need_a_uri(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MONGODB_URI", raising=False)
    code, _, err = run(capsys, "acks", "stats", "--db", "x")
    assert code == 2 and "MONGODB_URI" in err


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["acks", "list", "--db", "x", "--since", "yesterday"])
    assert exc.value.code == 2 and "not an ISO 8601 time" in capsys.readouterr().err


def test_monitor_serve_answers_http_and_stops_on_sigterm(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any]
) -> None:
    MongoMonitorStore(client.internal).write(
        [
            MonitorEntry(
                "e1", "orders", "shop.orders", "bus", MonitorStatus.COMPLETED, datetime.now(timezone.utc)
            ),
        ]
    )
    env = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mongo_events",
            "monitor",
            "serve",
            "--uri",
            fake_rs.uri,
            "--db",
            "internal",
            "--port",
            "0",
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            port = re.search(r":(\d+)/v1/monitor/entries", line)
            if port:
                break
        assert port, line
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port.group(1)}/v1/monitor/entries/count", timeout=10
        ) as resp:
            assert json.loads(resp.read()) == {"count": 1}
        # It runs no bus: health comes from the statuses consumers publish, and none did.
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/v1/health?bus=orders", timeout=10)
        assert (
            health.value.code == 503
            and "no consumer of bus 'orders'" in json.loads(health.value.read())["error"]
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/", timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/html") and b"Overview" in resp.read()
        assert stop_gracefully(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- what an operator sees: real processes, exit codes, one line on stderr -------------------------------

DEAD = "mongodb://127.0.0.1:1/?replicaSet=rs0&serverSelectionTimeoutMS=200&connectTimeoutMS=200"


def cli(*argv: str, env: dict[str, str] | None = None, cwd: Any = ROOT) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(cwd), str(ROOT)) if p)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mongo_events", *argv],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _one_line_usage_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["acks", "list", "--db", "x", "--limit", "0"], "--limit: must be from 1 to 1,000, got 0"),
        (["acks", "list", "--db", "x", "--limit", "5000"], "--limit: must be from 1 to 1,000"),
        (["acks", "list", "--db", "x", "--offset", "-1"], "--offset: must be from 0"),
        (["acks", "list", "--db", "x", "--since", "9999-12-31T23:59:59-01:00"], "not an ISO 8601 time"),
        (["dlq", "list", "--db", "x", "--limit", "99999999999999999999999"], "--limit: must be from 1"),
        (["dlq", "cleanup", "--db", "x", "--older-than", "inf"], "--older-than: not a duration"),
        (
            ["dlq", "cleanup", "--db", "x", "--older-than", "1000000d"],
            "--older-than: duration '1000000d' is longer",
        ),
        (["tail", "--db", "x", "--limit", "0"], "--limit: must be from 1"),
        (["tail", "--db", "x", "--limit", "-1"], "--limit: must be from 1"),
        (["monitor", "serve", "--db", "x", "--port", "70000"], "--port: must be from 0 to 65,535"),
        (["nonsense"], "invalid choice"),
        (
            ["dlq", "replay", "--db", "x", "--app", "nowhere_at_all:bus", "--uri", DEAD],
            "cannot load --app nowhere_at_all:bus: ModuleNotFoundError",
        ),
        (
            ["dlq", "replay", "--db", "x", "--app", "json:JSONDecodeError", "--uri", DEAD],
            "cannot load --app json:JSONDecodeError: TypeError",
        ),
        (
            ["dlq", "replay", "--db", "x", "--app", "json:__name__", "--uri", DEAD],
            "--app json:__name__ is not a mongo_events.Bus",
        ),
        (
            ["dlq", "replay", "--db", "x", "--app", "nocolon", "--uri", DEAD],
            "--app must look like package.module:bus",
        ),
        (["status", "--db", "x", "--uri", "mongodb://"], "bad MongoDB URI"),
    ],
)
def test_usage_errors_exit_2_with_one_line_and_no_traceback(argv: list[str], needle: str) -> None:
    _one_line_usage_error(cli(*argv), needle)


def test_an_app_module_that_fails_to_import_is_a_usage_error(tmp_path: Any) -> None:
    (tmp_path / "brokenapp.py").write_text("raise RuntimeError('settings missing')\n")
    _one_line_usage_error(
        cli("dlq", "replay", "--db", "x", "--uri", DEAD, "--app", "brokenapp:bus", cwd=tmp_path),
        "cannot load --app brokenapp:bus: RuntimeError: settings missing",
    )


def test_monitor_serve_on_a_port_in_use_or_a_bad_host_is_a_usage_error() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _one_line_usage_error(
            cli("monitor", "serve", "--uri", DEAD, "--db", "x", "--port", str(port)),
            f"cannot serve on 127.0.0.1:{port}",
        )
    _one_line_usage_error(
        cli("monitor", "serve", "--uri", DEAD, "--db", "x", "--host", "no-such-host.invalid", "--read-only"),
        "cannot serve on no-such-host.invalid",
    )


def test_monitor_serve_refuses_a_public_address_without_auth_or_read_only() -> None:
    _one_line_usage_error(
        cli("monitor", "serve", "--uri", DEAD, "--db", "x", "--host", "0.0.0.0"),
        "refusing to serve the dashboard on 0.0.0.0",
    )
    _one_line_usage_error(
        cli("monitor", "serve", "--uri", DEAD, "--db", "x", "--host", "0.0.0.0", "--basic-auth", "ops"),
        "--basic-auth must be USER:SECRET",
    )


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"mongo-events {me.__version__}"


def test_an_unknown_dead_letter_id_exits_4(fake_rs: FakeReplicaSet, tmp_path: Any) -> None:
    (tmp_path / "idapp.py").write_text(
        f"import pymongo, mongo_events as me\nbus = me.Bus(pymongo.MongoClient({fake_rs.uri!r}).shop.orders)\n"
    )
    base = ["--uri", fake_rs.uri, "--db", "internal"]
    for argv in (
        ["dlq", "show", "nope"],
        ["dlq", "delete", "nope", "--yes"],
        ["dlq", "replay", "--id", "nope", "--app", "idapp:bus"],
    ):
        result = cli(*argv, *base, cwd=tmp_path)
        assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr
        assert (
            result.stderr.strip().splitlines()[-1]
            == "mongo-events: no dead letter 'nope' in internal.event_dlq"
        )


def test_output_piped_into_head_ends_quietly(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any]
) -> None:
    client.internal.event_dlq.insert_many(
        [
            {
                "_id": f"l{i:04}",
                "event_name": "orders",
                "original_id": f"e{i}",
                "payload": {"pad": "x" * 500},
                "metadata": {},
                "error": "boom",
                "retry_count": 0,
                "source": "bus",
                "created_at": datetime(2026, 1, 1, tzinfo=timezone.utc),
            }
            for i in range(1000)
        ]
    )
    environ = {k: v for k, v in os.environ.items() if k != "MONGODB_URI"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mongo_events",
            "dlq",
            "list",
            "--uri",
            fake_rs.uri,
            "--db",
            "internal",
            "--limit",
            "1000",
        ],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["id"] == "l0000"
    proc.stdout.close()  # what `| head -1` does after its line
    err = proc.stderr.read()
    assert proc.wait(30) == 141
    assert "BrokenPipeError" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_the_uris_server_selection_timeout_is_honoured_and_tail_fails_when_unreachable() -> None:
    result = cli("tail", DEAD, "--db", "shop")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mongo-events: cannot reach the server:") and "Timeout: 0.2s" in last
    # --uri and MONGODB_URI work for tail as for every other command.
    assert "Timeout: 0.2s" in cli("tail", "--uri", DEAD, "--db", "shop").stderr
    from_env = cli("tail", "--db", "shop", env={"MONGODB_URI": DEAD})
    assert from_env.returncode == 1 and "Timeout: 0.2s" in from_env.stderr
    assert cli("tail", "--db", "shop").returncode == 2


def test_tail_past_its_limit_logs_no_retry_warning(
    fake_rs: FakeReplicaSet,
    client: pymongo.MongoClient[Any],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client.shop.orders.insert_one({"_id": "before"})  # the stream starts after this
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.wait(0.02):
            client.shop.orders.insert_one({"_id": i})
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with caplog.at_level(logging.INFO, logger="mongo_events"):
            code = main(
                ["tail", "--uri", fake_rs.uri, "--db", "shop", "--collection", "orders", "--limit", "1"]
            )
    finally:
        stop.set()
        thread.join()
    assert code == 0 and len(capsys.readouterr().out.splitlines()) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [
        r.getMessage() for r in caplog.records
    ]


def _bulk_letters(client: pymongo.MongoClient[Any], n: int, event: str = "orders") -> None:
    now = datetime.now(timezone.utc)
    client.internal.event_dlq.insert_many(
        [
            {
                "_id": f"{event}-{i:05}",
                "event_name": event,
                "original_id": f"{event}-e{i}",
                "payload": {
                    "_id": {"_data": "82" + "0" * 16},
                    "operationType": "insert",
                    "ns": {"db": "shop", "coll": "orders"},
                    "documentKey": {"_id": i},
                },
                "metadata": {},
                "error": "RuntimeError: bug",
                "retry_count": 2,
                "source": "bus",
                "created_at": now + timedelta(microseconds=i * 1000),
            }
            for i in range(n)
        ]
    )


def test_dlq_replay_pages_through_every_letter_with_progress_and_totals(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any], tmp_path: Any
) -> None:
    _bulk_letters(client, 1500)
    _bulk_letters(client, 3, event="broken")
    (tmp_path / "replayapp.py").write_text(
        "import pymongo, mongo_events as me\n"
        f"bus = me.Bus(pymongo.MongoClient({fake_rs.uri!r}).shop.orders)\n"
        "bus.subscribe(name='orders')(lambda ev: None)\n"
        "@bus.subscribe(name='broken')\n"
        "def broken(ev):\n    raise ValueError(f'no {ev.document_id}')\n"
    )
    result = cli(
        "dlq", "replay", "--uri", fake_rs.uri, "--db", "internal", "--app", "replayapp:bus", cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr  # three failed
    assert json_util.loads(result.stdout) == {"replayed": 1500, "failed": 3, "quarantined": 0, "skipped": 0}
    assert client.internal.event_dlq.count_documents({"retried_at": None}) == 3
    err = result.stderr
    assert (
        "replay: 100/1,503" in err and "replay: 1,500/1,503" in err
    )  # periodic counts (stderr is no terminal)
    for i in range(3):
        assert f"replay of broken-{i:05} failed: ValueError('no {i}')" in err
    assert (
        err.strip().splitlines()[-1]
        == "replayed 1,500 of 1,503 dead letters: 3 failed, 0 quarantined, 0 skipped"
    )


def test_status_shows_each_checkpoint_with_age_headroom_and_backlog(
    fake_rs: FakeReplicaSet, client: pymongo.MongoClient[Any]
) -> None:
    client.shop.orders.insert_one({"_id": 1})  # an oplog entry, older than the position
    store = me.MongoResumeTokenStore(client.shop["_event_resume_tokens"])
    position = datetime.now(timezone.utc) - timedelta(minutes=5)
    from bson import Timestamp

    store.save("shop.orders:worker-1", {"_data": "82" + "0" * 16}, Timestamp(position, 1))
    client.shop.event_dlq.insert_one(
        {
            "_id": "x",
            "event_name": "o",
            "original_id": "e",
            "metadata": {"resume_token_key": "shop.orders:worker-1"},
            "retry_count": 0,
            "created_at": position,
            "retried_at": None,
        }
    )
    me.MongoAckStore(client.shop["_event_acks"]).write([me.AckRecord("e1", position)])
    table = cli("status", "--uri", fake_rs.uri, "--db", "shop")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split() == ["KEY", "POSITION", "AGE", "OPLOG", "HEADROOM", "DEAD", "LETTERS"]
    cells = row.split()
    assert cells[0] == "shop.orders:worker-1" and cells[1] == position.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert re.fullmatch(r"5m\d+(\.\d+)?s|5m", cells[2]) and cells[4] == "1"
    assert "pending acks: 1; dead letters not replayed: 1" in table.stdout
    as_json = cli("status", "--uri", fake_rs.uri, "--db", "shop", "--json")
    docs = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert (
        docs[0]["key"] == "shop.orders:worker-1"
        and 300 <= docs[0]["age"] < 600
        and docs[0]["dead_letters"] == 1
    )
    assert docs[-1] == {"totals": {"pending_acks": 1, "dead_letters": 1}}


def test_replay_progress_is_one_updating_line_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from mongo_events.cli import _Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = _Progress(3)
    for done in (1, 2, 3):
        progress.update(done, {"replayed": done, "failed": 0})
    text = terminal.getvalue()
    assert text.startswith("\rreplay: 1/3 replayed 1, failed 0") and text.endswith(
        "\rreplay: 3/3 replayed 3, failed 0\n"
    )
    assert text.count("\n") == 1  # one line, rewritten in place


def test_durations_print_as_they_are_typed() -> None:
    from mongo_events.cli import format_duration

    assert [
        format_duration(timedelta(**kw))
        for kw in ({"days": 30}, {"hours": 12}, {"minutes": 90}, {"seconds": 90}, {"milliseconds": 250}, {})
    ] == [
        "30d",
        "12h",
        "1h30m",
        "1m30s",
        "250ms",
        "0s",
    ]


def test_dlq_replay_counts_a_skip_the_same_for_one_letter_and_many(
    fake_rs: FakeReplicaSet,
    client: pymongo.MongoClient[Any],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = me.MongoDeadLetterStore(client.internal["event_dlq"])
    orphan = _letter(store, "ev1", event="gone")  # no subscription of the app's bus replays it
    (tmp_path / "cli_skip_app.py").write_text(
        "import pymongo, mongo_events as me\n"
        f"bus = me.Bus(pymongo.MongoClient({fake_rs.uri!r}).shop.orders)\n"
        "bus.subscribe(name='orders')(lambda ev: None)\n"
    )
    monkeypatch.chdir(tmp_path)
    base = ["--uri", fake_rs.uri, "--db", "internal", "--app", "cli_skip_app:bus"]
    code, (result,), err = run(capsys, "dlq", "replay", *base)
    assert code == 0 and result["skipped"] == 1, err
    assert f"replay of {orphan} skipped: bus" in err and "no subscription 'gone'" in err
    code, (result,), err = run(capsys, "dlq", "replay", *base, "--id", orphan)
    assert code == 0 and result == {"id": orphan, "outcome": "skipped"}, err
    assert f"replay of {orphan} skipped: bus" in err and "no subscription 'gone'" in err
