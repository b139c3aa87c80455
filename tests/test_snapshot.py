"""The initial snapshot (issue 21): existing documents, then the stream, resumable mid-way."""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import mongomock
import pymongo
import pytest
from bson import ObjectId, json_util
from bson.timestamp import Timestamp

import mongo_events as me
import mongo_events.snapshot as snapshot_module
from mongo_events.health import OplogWindow
from mongo_events.snapshot import MIN_SPAN, SnapshotProgress, outrun_warning, parse_progress, progress_token
from mongo_events.testing import FakeReplicaSet

from .conftest import CLIENT_OPTIONS, wait_for
from .helpers import FAST, Recorder, fail_command, wait_for_fail_point


def _orders(client: pymongo.MongoClient[Any], n: int) -> None:
    client.shop.orders.insert_many([{"_id": i, "v": 0} for i in range(n)])


def test_a_snapshot_of_10000_documents_then_changes_in_per_document_order(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    _orders(client, 10_000)
    store = me.MemoryResumeTokenStore()
    rec = Recorder()
    bus = make_bus(
        client.shop.orders,
        ordering="stream",  # the assertions below read cross-document order
        resume_token_store=store,
        snapshot="initial",
        snapshot_batch_size=700,
        max_in_flight=500,
        full_document=me.FullDocument.UPDATE_LOOKUP,
    )
    bus.subscribe(
        lambda ev: rec.add((str(ev.operation_type), ev.document_id, (ev.full_document or {}).get("v")))
    )
    bus.start()
    # Changes during and after the scan: each document's snapshot event comes before them.
    for i in range(0, 10_000, 1000):
        client.shop.orders.update_one({"_id": i}, {"$set": {"v": 1}})
    client.shop.orders.insert_one({"_id": 10_000, "v": 0})
    got = rec.wait_until(lambda items: ("insert", 10_000, 0) in items, timeout=60)
    snap = [doc for op, doc, _ in got if op == "snapshot"]
    # Every document once; the one inserted during the scan may be read by it too (then again as an insert).
    assert sorted(d for d in snap if d != 10_000) == list(range(10_000)) and snap.count(10_000) <= 1
    for i in range(0, 10_000, 1000):
        ops = [op for op, doc, _ in got if doc == i]
        assert ops == ["snapshot", "update"], ops[:5]
    assert bus.health().phase == "streaming" and bus.health().snapshot_read in (10_000, 10_001)
    bus.stop()
    checkpoint = store.load(bus.resume_token_key)
    assert checkpoint is not None and parse_progress(checkpoint.token) is None  # it ends at the stream


def test_snapshot_initial_only_without_a_checkpoint_and_always_every_time(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    _orders(client, 5)
    store = me.MemoryResumeTokenStore()

    def run(mode: str | None) -> list[Any]:
        rec = Recorder()
        bus = make_bus(client.shop.orders, ordering="stream", resume_token_store=store, snapshot=mode)
        bus.subscribe(lambda ev: rec.add((str(ev.operation_type), ev.document_id)))
        bus.start()
        marker = f"marker-{id(bus)}"
        client.shop.orders.insert_one({"_id": marker})
        got = rec.wait_until(lambda items: ("insert", marker) in items)
        bus.stop()
        client.shop.orders.delete_one({"_id": marker})
        return [doc for op, doc in got if op == "snapshot" and doc != marker]  # the scan may see it

    assert run("initial") == [0, 1, 2, 3, 4]
    assert run("initial") == []  # a checkpoint exists: stream only
    assert run("always") == [0, 1, 2, 3, 4]
    bus = make_bus(client.shop.orders, ordering="stream", resume_token_store=store)
    bus.snapshot()
    assert run(None) == [0, 1, 2, 3, 4]  # Bus.snapshot() forces one at the next start


def test_an_interrupted_snapshot_continues_after_the_last_finished_id(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    _orders(client, 300)
    store = me.MemoryResumeTokenStore()
    release = threading.Event()
    seen = Recorder()

    def slow(ev: me.ChangeEvent) -> None:
        seen.add(ev.document_id)
        if ev.document_id == 150:
            release.wait(10)  # holds the window at 150: the checkpoint stays below it

    first = make_bus(
        client.shop.orders,
        ordering="stream",  # the assertions below read cross-document order
        resume_token_store=store,
        snapshot="initial",
        snapshot_batch_size=50,
        max_in_flight=40,
        max_workers=1,
    )
    first.subscribe(slow)
    first.start()
    seen.wait_until(lambda items: 150 in items)
    first.flush()
    checkpoint = store.load(first.resume_token_key)
    assert checkpoint is not None
    progress = parse_progress(checkpoint.token)
    assert progress is not None and progress.has_after and 100 <= progress.after < 150
    release.set()
    first.stop()
    done = parse_progress(store.load(first.resume_token_key).token)  # type: ignore[union-attr]
    after = done.after if done is not None else None
    rec = Recorder()
    second = make_bus(client.shop.orders, ordering="stream", resume_token_store=store, snapshot="initial")
    second.subscribe(lambda ev: rec.add(ev.document_id))
    second.start()
    client.shop.orders.insert_one({"_id": "end"})
    got = rec.wait_until(lambda items: "end" in items)
    snap = [d for d in got if d != "end"]
    if done is None:  # the first bus finished the scan before it stopped
        assert snap == []
    else:
        assert snap == list(range(after + 1, 300))  # not from the first _id
    assert set(seen.items) | set(snap) >= set(range(300))
    assert len(set(seen.items) & set(snap)) <= 40  # redelivered: at most max_in_flight


def test_snapshot_options_are_checked(client: pymongo.MongoClient[Any]) -> None:
    with pytest.raises(me.ConfigurationError, match="snapshot"):
        me.Bus(client.shop.orders, snapshot="sometimes")  # type: ignore[arg-type]
    with pytest.raises(me.ConfigurationError, match="snapshot_collections"):
        me.Bus(client, snapshot="initial")
    with pytest.raises(me.ConfigurationError, match="snapshot_batch_size"):
        me.Bus(client.shop.orders, snapshot="initial", snapshot_batch_size=0)


# -- the oplog headroom for T0 -------------------------------------------------------------


def test_outrun_warning_gives_the_numbers_only_when_the_oplog_drops_t0_before_the_scan_ends() -> None:
    # The oplog dropped 500 s of history in 100 s (5 s per second); T0 is 500 s ahead of its
    # oldest entry, so it falls off in 100 s, but 900 documents at 1 per second take 900 s.
    numbers = dict(
        t0=Timestamp(10_000, 5), first_oldest=Timestamp(9_000, 1), first_at=0.0, now=100.0, began=0.0
    )
    warning = outrun_warning(oldest=Timestamp(9_500, 1), read=100, total=1000, **numbers)  # type: ignore[arg-type]
    assert warning is not None
    assert "about 900s left to read (100 of ~1000 documents in 100s)" in warning
    assert "drops 5.00s of history per second" in warning and "falls off it in about 100s" in warning
    assert "Timestamp(10000, 5)" in warning and "Timestamp(9500, 1)" in warning
    # Nearly done: 90 s left, T0 lasts 100 s.
    assert outrun_warning(oldest=Timestamp(9_500, 1), read=910, total=1000, **numbers) is None  # type: ignore[arg-type]
    # An oplog that drops nothing (not full yet, or quiet) never warns, however slow the scan.
    assert outrun_warning(oldest=Timestamp(9_000, 1), read=1, total=10**9, **numbers) is None  # type: ignore[arg-type]
    # Whole-second cluster times: a look shorter than MIN_SPAN is no pace.
    short = {**numbers, "now": MIN_SPAN / 2}
    assert outrun_warning(oldest=Timestamp(9_500, 1), read=1, total=10**9, **short) is None  # type: ignore[arg-type]


def test_a_snapshot_that_may_outrun_the_oplog_says_so_at_error_and_goes_on(
    make_bus: Any,
    client: pymongo.MongoClient[Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _orders(client, 200)
    base = int(time.time())
    looks = itertools.count()

    def full_oplog(self: OplogWindow, max_age: float = 30.0) -> None:
        # A full oplog that drops 1000 s of history between looks, never quite reaching T0 (now).
        self.oldest_ts = Timestamp(base - 3000 + 1000 * min(next(looks), 2), 1)
        self.oldest = self.oldest_ts.time

    monkeypatch.setattr(OplogWindow, "refresh", full_oplog)
    monkeypatch.setattr(snapshot_module, "MIN_SPAN", 0.0)
    rec = Recorder()
    bus = make_bus(client.shop.orders, snapshot="initial", snapshot_batch_size=20, max_in_flight=20)
    bus.subscribe(lambda ev: rec.add(ev.document_id))
    with caplog.at_level(logging.ERROR, logger="mongo_events.snapshot"):
        bus.start()
        got = rec.wait_until(lambda items: set(items) >= set(range(200)))
    assert sorted(got) == list(range(200)) and bus.state is me.BusState.RUNNING  # a warning, not a stop
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors  # said once (at most once a minute)
    assert re.search(
        r"may outrun the oplog: about \d+s left to read \(20 of ~200 documents in \d+s\), but the oplog drops "
        r"[\d.]+s of history per second and T0 \(Timestamp\(\d+, \d+\)\) falls off it in about \d+s",
        errors[0],
    ), errors[0]


def _lose_t0_during_the_scan(
    **options: Any,
) -> tuple[me.Bus, Recorder, pymongo.MongoClient[Any], FakeReplicaSet]:
    """A bus whose snapshot T0 falls off a 30-entry oplog while its first document is handled."""
    rs = FakeReplicaSet(oplog_size=30).start()
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
    _orders(client, 100)
    gate = threading.Event()
    rec = Recorder()

    def held(ev: me.ChangeEvent) -> None:
        rec.add(ev.document_id)
        gate.wait(10)

    bus = me.Bus(
        client.shop.orders,
        **FAST,
        resume_token_store=me.MemoryResumeTokenStore(),
        snapshot="initial",
        snapshot_batch_size=10,
        max_in_flight=5,
        max_workers=1,
        **options,
    )
    bus.subscribe(held)
    bus.start()
    rec.wait(1)
    client.shop.other.insert_many([{"_id": i} for i in range(40)])  # 40 entries after T0: it is trimmed
    gate.set()
    return bus, rec, client, rs


def test_a_snapshot_whose_t0_falls_off_the_oplog_fails_with_resume_token_lost() -> None:
    bus, _, client, rs = _lose_t0_during_the_scan()
    try:
        assert wait_for(lambda: bus.state is me.BusState.FAILED, timeout=10), bus.state
        error = bus.error
        assert isinstance(error, me.ResumeTokenLost), repr(error)
        assert "outran the oplog" in str(error) and "older than the oldest oplog entry" in str(error)
        assert error.key == bus.resume_token_key and isinstance(error.since, Timestamp)
    finally:
        bus.stop(timeout=5)
        client.close()
        rs.stop()


def test_with_restart_from_now_a_lost_t0_is_an_error_line_and_the_snapshot_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="mongo_events.snapshot"):
        bus, rec, client, rs = _lose_t0_during_the_scan(on_history_lost="restart_from_now")
        try:
            got = rec.wait_until(lambda items: set(items) >= set(range(100)))
            assert sorted(set(got)) == list(range(100)) and bus.state is me.BusState.RUNNING
        finally:
            bus.stop(timeout=5)
            client.close()
            rs.stop()
    said = [
        r for r in caplog.records if "outran the oplog" in r.getMessage() and "going on" in r.getMessage()
    ]
    assert len(said) == 1, [r.getMessage() for r in said]  # once, not at every later batch


# -- database and cluster buses -----------------------------------------------------------


_MARKERS = itertools.count()


def _shop(client: pymongo.MongoClient[Any]) -> None:
    client.shop.orders.insert_many([{"_id": i} for i in range(5)])
    client.shop.users.insert_many([{"_id": f"u{i}"} for i in range(3)])


def _snapshot_of(bus: me.Bus, client: pymongo.MongoClient[Any], marker_coll: str = "users") -> list[Any]:
    """Start ``bus``, insert a marker document, return the (collection, _id) of every snapshot event."""
    rec = Recorder()
    bus.subscribe(lambda ev: rec.add((str(ev.operation_type), ev.collection, ev.document_id)))
    bus.start()
    marker = f"marker-{next(_MARKERS)}"
    client.shop[marker_coll].insert_one({"_id": marker})
    got = rec.wait_until(lambda items: ("insert", marker_coll, marker) in items)
    bus.stop()
    return sorted((c, d) for op, c, d in got if op == "snapshot" and not str(d).startswith("marker"))


def test_a_database_bus_snapshots_every_collection_but_the_library_stores(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    _shop(client)
    bus = make_bus(client.shop, snapshot="initial")  # the default store: shop._event_resume_tokens
    got = _snapshot_of(bus, client)
    assert got == [("orders", i) for i in range(5)] + [("users", f"u{i}") for i in range(3)]
    assert "_event_resume_tokens" in client.shop.list_collection_names()  # there, and not snapshotted


def test_snapshot_collections_limits_a_database_bus_and_names_a_cluster_bus_collections(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    _shop(client)
    client.inventory.items.insert_many([{"_id": "i0"}, {"_id": "i1"}])
    only_users = make_bus(
        client.shop,
        snapshot="initial",
        snapshot_collections=["users"],
        resume_token_store=me.MemoryResumeTokenStore(),
    )
    assert _snapshot_of(only_users, client) == [("users", f"u{i}") for i in range(3)]
    cluster = make_bus(
        client,
        snapshot="initial",
        snapshot_collections=["inventory.items", "shop.orders"],
        resume_token_store=me.MemoryResumeTokenStore(),
    )
    assert _snapshot_of(cluster, client) == [("items", "i0"), ("items", "i1")] + [
        ("orders", i) for i in range(5)
    ]


def test_an_interrupted_database_snapshot_continues_in_the_collection_it_was_reading(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    _shop(client)
    store = me.MemoryResumeTokenStore()
    bus = make_bus(client.shop, snapshot="initial", resume_token_store=store)
    with client.shop.watch() as stream:
        t0 = stream.resume_token
    # As a process killed in the middle of shop.users leaves it: orders done, users up to u0.
    marker = progress_token(SnapshotProgress(t0, "shop.users", "u0", True))
    store.save(bus.resume_token_key, marker, namespace="shop.*", level="database")
    assert _snapshot_of(bus, client) == [("users", "u1"), ("users", "u2")]
    checkpoint = store.load(bus.resume_token_key)
    assert checkpoint is not None and parse_progress(checkpoint.token) is None  # at the stream now


@pytest.mark.parametrize(
    "fault", [{"errorCode": 43}, {"closeConnection": True}], ids=["cursor-not-found", "dropped-connection"]
)
def test_a_scan_cursor_that_dies_reopens_after_the_last_id_read(
    make_bus: Any, client: pymongo.MongoClient[Any], fault: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    _orders(client, 100)
    rec = Recorder()
    bus = make_bus(client.shop.orders, snapshot="initial", snapshot_batch_size=10, ordering="stream")
    bus.subscribe(lambda ev: rec.add(ev.document_id))
    # Only the scan sends getMore before the stream opens: its first one fails.
    with caplog.at_level(logging.WARNING, logger="mongo_events.snapshot"):
        with fail_command(client, {"times": 1}, failCommands=["getMore"], **fault) as armed:
            bus.start()
            wait_for_fail_point(client, armed, 1)
        got = rec.wait_until(lambda items: len(items) >= 100)
    assert got == list(range(100))  # each document once, in order: read on after _id 9
    assert any("reading on after _id 9" in r.getMessage() for r in caplog.records), caplog.text
    assert bus.state is me.BusState.RUNNING


# -- metrics and health ---------------------------------------------------------------------


def test_snapshot_progress_and_phase_in_health_and_metrics(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    def gauges() -> dict[tuple[str, str], float]:
        out = {}
        data = reader.get_metrics_data()
        for rm in data.resource_metrics if data is not None else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for p in metric.data.data_points:
                        if metric.name.startswith(("mongodb.snapshot.", "mongodb.stream.phase")):
                            assert p.attributes["namespace"] == "shop.orders"
                            out[(metric.name, str(p.attributes.get("phase", "")))] = p.value
        return out

    _orders(client, 300)
    gate = threading.Event()
    rec = Recorder()

    def held(ev: me.ChangeEvent) -> None:
        rec.add(ev.document_id)
        if ev.document_id == 100:
            gate.wait(10)

    bus = make_bus(
        client.shop.orders,
        snapshot="initial",
        snapshot_batch_size=20,
        max_in_flight=20,
        ordering="stream",
        metrics=me.Metrics(meter_provider=provider),
    )
    bus.subscribe(held)
    try:
        bus.start()
        rec.wait_until(lambda items: 100 in items)
        health = bus.health()
        assert health.phase == "snapshot" and health.snapshot_total == 300
        assert health.snapshot_read is not None and 100 < health.snapshot_read <= 121  # the window holds 20
        during = gauges()
        assert (
            during[("mongodb.stream.phase", "snapshot")] == 1
            and during[("mongodb.stream.phase", "streaming")] == 0
        )
        assert during[("mongodb.snapshot.total", "")] == 300
        assert 100 < during[("mongodb.snapshot.documents", "")] <= 121
        gate.set()
        rec.wait(300)
        assert wait_for(lambda: bus.health().phase == "streaming")
        after = gauges()
        assert (
            after[("mongodb.stream.phase", "snapshot")] == 0
            and after[("mongodb.stream.phase", "streaming")] == 1
        )
        assert (
            after[("mongodb.snapshot.documents", "")] == 300 and after[("mongodb.snapshot.total", "")] == 300
        )
        health = bus.health()
        assert (health.snapshot_read, health.snapshot_total) == (300, 300)
    finally:
        gate.set()
        bus.stop()
        provider.shutdown()


def test_a_bus_without_a_snapshot_reports_the_streaming_phase_only(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    bus = make_bus(client.shop.orders)
    bus.subscribe(lambda ev: None)
    bus.start()
    health = bus.health()
    assert (health.phase, health.snapshot_read, health.snapshot_total) == ("streaming", None, None)
    assert health.to_json()["phase"] == "streaming"


# -- how stores keep snapshot progress --------------------------------------------------------

T0 = {"_data": "826B10570400000001"}


@pytest.fixture(params=["file", "mongomock", "fake_rs"])
def raw_store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[Any, Callable[..., Any]]]:
    """A store, and ``raw(update=None)``: its stored entry for key "k" (after applying ``update``)."""
    if request.param == "file":
        path = tmp_path / "tokens.json"
        file_store = me.FileResumeTokenStore(path)

        def raw_file(update: dict[str, Any] | None = None) -> Any:
            data = json_util.loads(path.read_text())
            if update is not None:
                data["k"].update(update)
                path.write_text(json_util.dumps(data, json_options=json_util.CANONICAL_JSON_OPTIONS))
            return data["k"]

        yield file_store, raw_file
        return
    rs = None
    if request.param == "mongomock":
        coll = mongomock.MongoClient().db["_event_resume_tokens"]
    else:
        rs = FakeReplicaSet().start()
        coll = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS).db["_event_resume_tokens"]

    def raw_doc(update: dict[str, Any] | None = None) -> Any:
        if update is not None:
            coll.update_one({"_id": "k"}, {"$set": update})
        return coll.find_one({"_id": "k"})

    yield me.MongoResumeTokenStore(coll), raw_doc
    if rs is not None:
        coll.database.client.close()
        rs.stop()


def test_stores_keep_snapshot_progress_beside_a_real_token(raw_store: tuple[Any, Callable[..., Any]]) -> None:
    store, raw = raw_store
    after = ObjectId()
    marker = progress_token(SnapshotProgress(T0, "shop.orders", after, True))
    store.save("k", marker, namespace="shop.orders", level="collection")
    entry = raw()
    # T0 itself is the token (any reader, the Go library too, can resume from it); progress beside it.
    assert entry["token"] == T0 and entry["snapshot"] == {"t0": T0, "ns": "shop.orders", "after": after}
    loaded = store.load("k")
    assert loaded is not None and loaded.token == marker
    progress = parse_progress(loaded.token)
    assert progress == SnapshotProgress(T0, "shop.orders", after, True)
    # Before the first document is done there is no "after".
    store.save("k", progress_token(SnapshotProgress(T0, "shop.orders")))
    assert "after" not in raw()["snapshot"]
    assert parse_progress(store.load("k").token) == SnapshotProgress(T0, "shop.orders")
    # The stream's token replaces it: no snapshot field is left behind.
    store.save("k", {"_data": "826B105800000000"})
    assert "snapshot" not in raw() and store.load("k").token == {"_data": "826B105800000000"}


def test_a_requested_snapshot_and_old_markers_stay_readable(
    raw_store: tuple[Any, Callable[..., Any]],
) -> None:
    store, raw = raw_store
    requested = progress_token(SnapshotProgress(None))
    store.save("k", requested)  # no T0 yet: a marker in the token, until the next start takes T0
    assert "snapshot" not in raw() and parse_progress(store.load("k").token) == SnapshotProgress(None)
    old = progress_token(SnapshotProgress(T0, "shop.orders", 7, True))  # as 0.1 stored progress
    raw({"token": old})
    assert parse_progress(store.load("k").token) == SnapshotProgress(T0, "shop.orders", 7, True)


@pytest.mark.parametrize(
    ("snapshot", "problem"),
    [
        ("shop.orders", "snapshot field is a str"),
        ({"ns": "shop.orders", "after": 1}, "T0 is unusable: it is missing"),
        ({"t0": {"_data": ""}, "ns": "shop.orders"}, "T0 is unusable"),
        ({"t0": T0, "after": 1}, "names no collection"),
        ({"t0": T0, "ns": "shop.orders", "upto": 3}, "unknown fields ['upto']"),
    ],
)
def test_a_malformed_snapshot_field_is_refused_loudly(
    raw_store: tuple[Any, Callable[..., Any]], snapshot: Any, problem: str
) -> None:
    store, raw = raw_store
    store.save("k", progress_token(SnapshotProgress(T0, "shop.orders", 1, True)))
    raw({"snapshot": snapshot})
    with pytest.raises(me.StoreError, match="malformed") as info:
        store.load("k")
    assert problem in str(info.value)


def test_a_token_written_since_by_something_that_does_not_know_snapshots_wins(
    raw_store: tuple[Any, Callable[..., Any]], caplog: pytest.LogCaptureFixture
) -> None:
    store, raw = raw_store
    store.save("k", progress_token(SnapshotProgress(T0, "shop.orders", 1, True)))
    raw({"token": {"_data": "826B1060000000000A"}})  # the Go library, or an old version, saved its position
    with caplog.at_level(logging.WARNING, logger="mongo_events.snapshot"):
        loaded = store.load("k")
    assert loaded is not None and loaded.token == {"_data": "826B1060000000000A"}
    assert "the token wins" in caplog.text


def test_a_snapshot_of_a_raw_bson_collection_delivers_plain_documents(
    make_bus: Any, client: pymongo.MongoClient[Any]
) -> None:
    from bson.raw_bson import RawBSONDocument

    _orders(client, 5)
    orders = client.shop.orders
    raw = orders.with_options(codec_options=orders.codec_options.with_options(document_class=RawBSONDocument))
    rec = Recorder()
    bus = make_bus(raw, snapshot="initial", resume_token_store=me.MemoryResumeTokenStore())
    bus.subscribe(rec.add)
    bus.start()
    got = rec.wait(5)
    assert sorted(ev.document_id for ev in got) == list(range(5))
    assert all(
        type(ev.full_document) is dict and ev.full_document == orders.find_one(ev.document_id) for ev in got
    )
