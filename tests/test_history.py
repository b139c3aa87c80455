"""Rewinding a checkpoint to a time, and start_from_past="all" (issue 21), against the fake."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone
from typing import Any

import pymongo
import pytest
from bson import json_util
from bson.timestamp import Timestamp

import mongo_events as me
from mongo_events.cli import main
from mongo_events.history import rewind_time
from mongo_events.testing import FakeReplicaSet

from .conftest import CLIENT_OPTIONS
from .helpers import Recorder

_SENTINELS = itertools.count()


def _oplog_times(client: pymongo.MongoClient[Any]) -> list[Timestamp]:
    return [doc["ts"] for doc in client.local["oplog.rs"].find({}, sort=[("$natural", 1)])]


def _insert_each(client: pymongo.MongoClient[Any], ids: range) -> list[Timestamp]:
    """Insert one document per write; the oplog time of each insert."""
    times = []
    for i in ids:
        client.shop.orders.insert_one({"_id": i})
        times.append(_oplog_times(client)[-1])
    return times


def _delivered_until_sentinel(make_bus: Any, client: pymongo.MongoClient[Any], **options: Any) -> list[Any]:
    """Start a bus, insert a fresh sentinel, and return every document id delivered up to it.

    The sentinel is a new ``sentinel-N`` document each time; it shows as ``"sentinel"``.
    """
    sentinel = f"sentinel-{next(_SENTINELS)}"
    rec = Recorder()
    bus = make_bus(client.shop.orders, ordering="stream", **options)
    bus.subscribe(lambda ev: rec.add(ev.document_id))
    bus.start()
    client.shop.orders.insert_one({"_id": sentinel})
    items = rec.wait_until(lambda got: sentinel in got)
    bus.stop()
    return ["sentinel" if item == sentinel else item for item in items]


def test_rewind_redelivers_every_change_from_the_given_time(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    store = me.MemoryResumeTokenStore()
    first = make_bus(client.shop.orders, ordering="stream", resume_token_store=store, resume_token_id="w")
    rec = Recorder()
    first.subscribe(lambda ev: rec.add(ev.document_id))
    first.start()
    times = _insert_each(client, range(5))
    rec.wait(5)
    first.stop()
    assert rewind_time(store.load("shop.orders:w").token) is None  # type: ignore[union-attr]

    first.rewind(to=times[2])
    checkpoint = store.load("shop.orders:w")
    assert checkpoint is not None and rewind_time(checkpoint.token) == times[2]
    assert checkpoint.namespace == "shop.orders" and checkpoint.cluster_time == times[2]
    got = _delivered_until_sentinel(make_bus, client, resume_token_store=store, resume_token_id="w")
    assert got == [2, 3, 4, "sentinel"]
    # The rewind is used once: the next start resumes after what was delivered.
    assert rewind_time(store.load("shop.orders:w").token) is None  # type: ignore[union-attr]
    client.shop.orders.insert_one({"_id": 5})
    again = _delivered_until_sentinel(make_bus, client, resume_token_store=store, resume_token_id="w")
    assert again[0] == 5


def test_rewind_takes_a_datetime_and_refuses_while_running(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    store = me.MemoryResumeTokenStore()
    client.shop.orders.insert_one({"_id": "before"})
    bus = make_bus(client.shop.orders, ordering="stream", resume_token_store=store)
    bus.subscribe(lambda ev: None)
    bus.start()
    with pytest.raises(me.BusStateError, match="stop the bus before rewind"):
        bus.rewind(to=datetime.now(timezone.utc))
    bus.stop()
    oldest = _oplog_times(client)[0]
    bus.rewind(to=datetime.fromtimestamp(oldest.time, timezone.utc))
    got = _delivered_until_sentinel(make_bus, client, resume_token_store=store)
    assert got[0] == "before" and got[-1] == "sentinel"


def test_rewind_refuses_a_time_older_than_the_oplog_and_names_its_first_entry(make_bus: Any) -> None:
    with FakeReplicaSet(oplog_size=5) as rs:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        client.shop.orders.insert_many([{"_id": i} for i in range(20)], ordered=True)
        for i in range(20, 30):
            client.shop.orders.insert_one({"_id": i})  # the oplog rolls over
        store = me.MemoryResumeTokenStore()
        store.save("shop.orders:w", {"_data": "82AA"})
        bus = make_bus(client.shop.orders, ordering="stream", resume_token_store=store, resume_token_id="w")
        oldest = _oplog_times(client)[0]
        with pytest.raises(me.ConfigurationError) as info:
            bus.rewind(to=Timestamp(oldest.time - 3600, 0))
        assert "oldest entry" in str(info.value) and str(oldest) in str(info.value)
        assert store.load("shop.orders:w").token == {"_data": "82AA"}  # type: ignore[union-attr]
        client.close()


def test_start_from_past_all_starts_at_the_oldest_oplog_entry(make_bus: Any) -> None:
    with FakeReplicaSet(oplog_size=5) as rs:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        for i in range(12):
            client.shop.orders.insert_one({"_id": i})  # only the last 5 stay in the oplog
        got = _delivered_until_sentinel(
            make_bus, client, start_from_past="all", resume_token_store=me.MemoryResumeTokenStore()
        )
        assert got == [7, 8, 9, 10, 11, "sentinel"]
        client.close()


def test_start_from_past_older_than_the_oplog_says_so_plainly(make_bus: Any) -> None:
    with FakeReplicaSet(oplog_size=5) as rs:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        for i in range(12):
            client.shop.orders.insert_one({"_id": i})
        bus = make_bus(client.shop.orders, ordering="stream", start_from_past=timedelta(days=365))
        bus.subscribe(lambda ev: None)
        with pytest.raises(me.ResumeTokenLost) as info:
            bus.start()
        message = str(info.value)
        assert "older than the oldest entry in the oplog" in message
        assert "start_from_past='all'" in message
        assert "None" not in message and "reset_resume_token" not in message
        client.close()


def test_start_from_past_rejects_other_strings() -> None:
    client: pymongo.MongoClient[Any] = pymongo.MongoClient("mongodb://127.0.0.1:1", connect=False)
    with pytest.raises(me.ConfigurationError, match="start_from_past"):
        me.Bus(client.shop.orders, start_from_past="everything")  # type: ignore[arg-type]
    client.close()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[Any], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, [json_util.loads(line) for line in out.splitlines() if line.strip()], err


def test_cli_tokens_rewind_dry_run_then_apply(
    make_bus: Any,
    fake_rs: FakeReplicaSet,
    client: pymongo.MongoClient[Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = me.MongoResumeTokenStore(client.shop["_event_resume_tokens"])
    first = make_bus(client.shop.orders, ordering="stream", resume_token_store=store, resume_token_id="w")
    rec = Recorder()
    first.subscribe(lambda ev: rec.add(ev.document_id))
    first.start()
    times = _insert_each(client, range(4))
    rec.wait(4)
    first.stop()
    before = store.load("shop.orders:w")
    to = datetime.fromtimestamp(times[1].time, timezone.utc).isoformat().replace("+00:00", "Z")
    base = ("tokens", "rewind", "--uri", fake_rs.uri, "--db", "shop", "--to", to)

    code, docs, err = _cli(capsys, *base)
    assert code == 0 and "dry run" in err and "--yes" in err
    (plan,) = docs
    assert plan["keys"] == ["shop.orders:w"] and plan["applied"] is False
    after_to = [t for t in _oplog_times(client) if t.time >= times[1].time]
    assert plan["oplog_entries_after"] == len(after_to) >= 3
    assert store.load("shop.orders:w") == before  # a dry run writes nothing

    code, docs, err = _cli(capsys, *base, "--key", "shop.orders:w", "--yes")
    assert code == 0 and docs[0]["applied"] is True and "rewound 1" in err
    rewound = store.load("shop.orders:w")
    assert rewound is not None and rewind_time(rewound.token) in (
        Timestamp(times[1].time, 0),
        _oplog_times(client)[0],
    )
    got = _delivered_until_sentinel(make_bus, client, resume_token_store=store, resume_token_id="w")
    assert 1 in got and 2 in got and 3 in got and got[-1] == "sentinel"
    assert got.index(1) < got.index(2) < got.index(3)


def test_cli_tokens_rewind_refuses_a_time_older_than_the_oplog(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with FakeReplicaSet(oplog_size=5) as rs:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        for i in range(12):
            client.shop.orders.insert_one({"_id": i})
        store = me.MongoResumeTokenStore(client.shop["_event_resume_tokens"])
        store.save("shop.orders:w", {"_data": "82AA"})
        oldest = _oplog_times(client)[0]
        code, _, err = _cli(
            capsys,
            "tokens",
            "rewind",
            "--uri",
            rs.uri,
            "--db",
            "shop",
            "--to",
            "2000-01-01T00:00:00Z",
            "--yes",
        )
        assert code == 1 and "oldest entry" in err and str(oldest) in err
        assert store.load("shop.orders:w").token == {"_data": "82AA"}  # type: ignore[union-attr]
        client.close()
