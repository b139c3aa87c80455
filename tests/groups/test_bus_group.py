"""Bus(group=...) in one process: several members against the fake replica set share the partitions."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pymongo
import pytest

import mongo_events as me
from mongo_events.groups import GroupMismatch, partition_of
from mongo_events.groups import runtime as group_runtime

from ..conftest import wait_for
from ..helpers import FAST
from .helpers import group_buses, held


class Log:
    """(member, document id, value) per delivery, thread-safe."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any, int]] = []
        self.lock = threading.Lock()

    def add(self, member: str, doc: Any, value: int) -> None:
        with self.lock:
            self.items.append((member, doc, value))

    def snapshot(self) -> list[tuple[str, Any, int]]:
        with self.lock:
            return list(self.items)


@pytest.fixture
def members(client: pymongo.MongoClient[Any]) -> Iterator[Callable[..., me.Bus]]:
    with group_buses(client, group="billing", partitions=4, lease_ttl=1.5) as make:

        def member(name: str, log: Log, **options: Any) -> me.Bus:
            bus = make(name, **options)

            @bus.subscribe
            def record(event: me.ChangeEvent) -> None:
                desc = event.update_description  # the change's own value, not a later looked-up one
                fields = desc.updated_fields if desc is not None else (event.full_document or {})
                log.add(name, (event.document_key or {}).get("_id"), fields.get("v", -1))

            return bus

        yield member


def spread(buses: list[me.Bus], partitions: int) -> bool:
    shares = [held(b) for b in buses]
    union = set().union(*shares)
    return (
        union == set(range(partitions))
        and sum(len(s) for s in shares) == partitions
        and max(len(s) for s in shares) - min(len(s) for s in shares) <= 1
    )


@pytest.mark.parametrize("mode", ["server", "client"])
def test_each_change_is_handled_by_one_member_in_document_order(
    members: Callable[..., me.Bus],
    client: pymongo.MongoClient[Any],
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if mode == "client":  # as on a server without $toHashedIndexKey
        monkeypatch.setattr(group_runtime, "server_supports_hashed_keys", lambda coll: False)
    log = Log()
    buses = [members(f"m{i}", log, partitions=6) for i in range(3)]
    for bus in buses:
        bus.start()
    # Given three members that have settled on two partitions each
    assert wait_for(lambda: spread(buses, 6), timeout=10), [held(b) for b in buses]
    assert {b.health().group.mode for b in buses} == {mode}  # type: ignore[union-attr]
    # When 40 documents are inserted and updated twice each
    coll = client.shop.orders
    for i in range(40):
        coll.insert_one({"_id": i, "v": 0})
    for v in (1, 2):
        for i in range(40):
            coll.update_one({"_id": i}, {"$set": {"v": v}})
    assert wait_for(lambda: len(log.snapshot()) >= 120, timeout=30), len(log.snapshot())
    items = log.snapshot()
    # Then every change was handled exactly once, by the member holding its partition, in order
    assert len(items) == 120
    shares = {b.name: held(b) for b in buses}
    by_doc: dict[int, list[tuple[str, int]]] = {}
    for member, doc, value in items:
        by_doc.setdefault(doc, []).append((member, value))
    assert sorted(by_doc) == list(range(40))
    for doc, seen in by_doc.items():
        assert [v for _, v in seen] == [0, 1, 2], f"document {doc}: {seen}"
        assert {m for m, _ in seen} == {m for m, s in shares.items() if partition_of(doc, 6) in s}
    assert all(len({m for m, _ in seen}) == 1 for seen in by_doc.values())


def test_members_rebalance_when_one_joins_and_when_one_leaves(members: Callable[..., me.Bus]) -> None:
    log = Log()
    first = members("first", log).start()
    # Alone, it takes every partition (a lease call that timed out on a loaded machine is
    # taken at a later poll, every ttl / 12)
    assert wait_for(lambda: held(first) == {0, 1, 2, 3}, timeout=10.0)
    second = members("second", log).start()
    # A join: the first releases its surplus, the second takes it (within 2 x lease_ttl when
    # no lease call times out; a timed-out one is retried at the next poll)
    assert wait_for(lambda: spread([first, second], 4), timeout=10.0), (held(first), held(second))
    assert len(held(first)) == len(held(second)) == 2
    # A clean leave: the other takes everything back at its next poll
    second.stop()
    assert wait_for(lambda: held(first) == {0, 1, 2, 3}, timeout=10.0), held(first)
    assert second.health().group.lease_state == "stopped"  # type: ignore[union-attr]


def test_active_standby_clean_stop_hands_over_before_the_lease_could_expire(
    members: Callable[..., me.Bus], client: pymongo.MongoClient[Any]
) -> None:
    # A long lease: only a release (not an expiry) lets the standby take over within the wait.
    log = Log()
    active = members("active", log, partitions=1, lease_ttl=30.0).start()
    assert wait_for(lambda: held(active) == {0}, timeout=10.0)  # before the standby may join
    standby = members("standby", log, partitions=1, lease_ttl=30.0).start()
    assert held(standby) == set()
    assert standby.health().group.lease_state == "standby"  # type: ignore[union-attr]
    assert standby.health().status == "healthy"
    client.shop.orders.insert_one({"_id": "before"})
    assert wait_for(lambda: len(log.snapshot()) == 1, timeout=10.0), log.snapshot()
    active.stop()
    # A poll is 2.5 s here; the lease, renewed every 10 s, would expire 20 to 30 s after the
    # stop: taking it within 15 s proves the release (a lease call may time out, after 5 s).
    assert wait_for(lambda: held(standby) == {0}, timeout=15.0), held(standby)
    client.shop.orders.insert_one({"_id": "after"})
    assert wait_for(lambda: len(log.snapshot()) == 2, timeout=10.0), log.snapshot()
    assert [(m, d) for m, d, _ in log.snapshot()] == [("active", "before"), ("standby", "after")]


def test_a_refused_fenced_write_stops_the_partition_without_failing_the_bus(
    members: Callable[..., me.Bus], client: pymongo.MongoClient[Any], caplog: pytest.LogCaptureFixture
) -> None:
    log = Log()
    bus = members("stale", log, partitions=1, lease_ttl=30.0).start()
    assert wait_for(lambda: held(bus) == {0}, timeout=10.0)
    witness_log = Log()
    witness = me.Bus(client.shop.orders, **FAST, resume=False, name="witness")
    witness.subscribe(lambda e: witness_log.add("witness", e.document_key["_id"], 0))
    witness.start()
    try:
        key = "billing:shop.orders#0"
        db = client.shop
        lease = db["_event_leases"].find_one({"_id": key})
        assert lease is not None and lease["fence"] == 1
        # Given another member that took the partition over behind this one's back
        # (its lease and a checkpoint written with fence 2)
        db["_event_leases"].update_one(
            {"_id": key}, {"$set": {"owner": {"host": "other", "pid": 1, "id": "x" * 32}, "fence": 2}}
        )
        db["_event_resume_tokens"].update_one({"_id": key}, {"$set": {"fence": 2, "marker": "theirs"}})
        caplog.set_level(logging.WARNING, logger="mongo_events")
        # When this member handles an event and flushes its checkpoint
        db.orders.insert_one({"_id": 1})
        assert wait_for(lambda: len(log.snapshot()) == 1, timeout=10.0), log.snapshot()
        assert wait_for(lambda: held(bus) == set(), timeout=10.0), held(bus)
        # Then the write was refused, the partition stopped, the bus runs on
        assert any("taken over by another member" in r.getMessage() for r in caplog.records)
        assert bus.state is me.BusState.RUNNING and bus.error is None
        stored = db["_event_resume_tokens"].find_one({"_id": key})
        assert stored is not None and stored["fence"] == 2 and stored["marker"] == "theirs"
        # and it delivers nothing more of that partition
        db.orders.insert_one({"_id": 2})
        assert wait_for(lambda: len(witness_log.snapshot()) == 2, timeout=10.0), witness_log.snapshot()
        assert bus.flush()
        assert [d for _, d, _ in log.snapshot()] == [1]
    finally:
        witness.stop(timeout=5)


def test_a_member_with_another_partition_count_is_refused(members: Callable[..., me.Bus]) -> None:
    log = Log()
    members("a", log, partitions=2).start()
    other = members("b", log, partitions=3)
    with pytest.raises(GroupMismatch, match="partitions=2"):
        other.start()
    assert other.state is me.BusState.FAILED


def test_a_member_with_another_partition_mode_is_refused(
    members: Callable[..., me.Bus], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = Log()
    members("a", log, partitions=2).start()
    monkeypatch.setattr(group_runtime, "server_supports_hashed_keys", lambda coll: False)
    with pytest.raises(GroupMismatch, match="mode='server'"):
        members("b", log, partitions=2).start()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"group": ""}, "group"),
        ({"group": "a:b"}, "group"),
        ({"group": 3}, "group"),
        ({"group": "g", "partitions": 0}, "partitions"),
        ({"group": "g", "partitions": True}, "partitions"),
        ({"group": "g", "lease_ttl": 0}, "lease_ttl"),
        ({"group": "g", "lease_ttl": float("inf")}, "lease_ttl"),
        ({"group": "g", "lease_ttl": 0.001}, "at least 0.5 s"),  # never joins, floods the log
        ({"lease_ttl": 0.1}, "at least 0.5 s"),  # checked without a group too
        ({"group": "billing "}, "leading or trailing spaces"),  # would be a group of its own
        ({"group": " "}, "leading or trailing spaces"),
        ({"group": "a\nb"}, "printable"),
        ({"group": "g" * 101}, "at most 100"),
        ({"partitions": 4}, "also pass group"),
        ({"group": "g", "resume": False}, "resume=False"),
        ({"group": "g", "partitions": 2, "snapshot": "initial"}, "snapshot"),
        ({"group": "g", "resume_token_store": me.MemoryResumeTokenStore()}, "fenced"),
    ],
)
def test_group_options_are_checked_where_given(
    client: pymongo.MongoClient[Any], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(me.ConfigurationError, match=message):
        me.Bus(client.shop.orders, **options)


def test_buses_of_one_group_name_on_different_collections_are_separate_groups(
    client: pymongo.MongoClient[Any],
) -> None:
    # One group name for every bus of an app (Flask's MONGO_EVENTS_GROUP, Django's GROUP):
    # the members of one collection must not count as members of the other's group, which
    # gave the other's partitions to a member that never takes them (nothing delivered, no
    # warning), nor must the two share one partition count.
    got = Log()
    buses = []
    try:
        for coll, partitions in (("orders", 2), ("invoices", 1)):
            bus = me.Bus(client.shop[coll], **FAST, group="web", partitions=partitions, lease_ttl=1.5)
            bus.subscribe(functools.partial(lambda c, e: got.add(c, e.document_key["_id"], 0), coll))
            buses.append(bus.start())
        orders, invoices = buses
        assert wait_for(lambda: held(orders) == {0, 1} and held(invoices) == {0}, timeout=10), (
            held(orders),
            held(invoices),
        )
        assert orders.health().group.members == invoices.health().group.members == 1  # type: ignore[union-attr]
        for i in range(10):
            client.shop.orders.insert_one({"_id": i})
            client.shop.invoices.insert_one({"_id": i})
        assert wait_for(lambda: len(got.snapshot()) == 20, timeout=10), got.snapshot()
        assert sorted((c, d) for c, d, _ in got.snapshot()) == sorted(
            [("invoices", i) for i in range(10)] + [("orders", i) for i in range(10)]
        )
        docs = {d["_id"]: d for d in client.shop["_event_leases"].find({"_id": {"$regex": "^group:"}})}
        assert {k: v["partitions"] for k, v in docs.items()} == {
            "group:web:shop.orders": 2,
            "group:web:shop.invoices": 1,
        }
    finally:
        for bus in buses:
            bus.stop(timeout=5)


def test_health_and_metrics_report_the_group(members: Callable[..., me.Bus]) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        metrics = me.Metrics(meter_provider=provider)
        log = Log()
        first = members("first", log, metrics=metrics).start()
        # Alone, it takes every partition first (its share counted once): a second member
        # joining while the first's lease calls still time out would make the two compute
        # their shares from different holders for a poll, and change them once more.
        assert wait_for(lambda: held(first) == {0, 1, 2, 3}, timeout=10.0), held(first)
        second = members("second", log, metrics=metrics).start()
        assert wait_for(lambda: spread([first, second], 4), timeout=10.0), (held(first), held(second))
        status = first.health().group
        assert status is not None
        assert (status.name, status.partitions, status.members, status.lease_state) == (
            "billing",
            4,
            2,
            "active",
        )
        assert len(status.held) == 2 and all(fence >= 1 for fence in status.held.values())
        assert first.health().to_json()["group"]["members"] == 2

        def points() -> dict[str, list[tuple[dict[str, Any], Any]]]:
            out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
            data = reader.get_metrics_data()
            for rm in data.resource_metrics if data else ():
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        for p in metric.data.data_points:
                            out.setdefault(metric.name, []).append((dict(p.attributes or {}), p.value))
            return out

        got = points()
        # both members live in this process: their partitions are summed
        assert got["mongodb.group.partitions_owned"] == [
            ({"namespace": "shop.orders", "group": "billing"}, 4)
        ]
        # the first member's share changed twice (all 4, then 2), the second's once
        assert sum(v for _, v in got["mongodb.group.rebalances"]) == 3
    finally:
        provider.shutdown()


def test_a_database_group_does_not_see_its_own_lease_and_checkpoint_writes(
    client: pymongo.MongoClient[Any],
) -> None:
    got = Log()
    bus = me.Bus(client.shop, **FAST, group="db", partitions=2, lease_ttl=1.5)
    bus.subscribe(
        lambda e: got.add(e.collection or "", e.document_key.get("_id") if e.document_key else None, 0)
    )
    bus.start()
    try:
        for i in range(10):
            client.shop.orders.insert_one({"_id": i})
        client.shop.users.insert_one({"_id": "u"})
        assert wait_for(lambda: len(got.snapshot()) >= 11, timeout=10), got.snapshot()
        assert bus.flush()  # checkpoint writes
        leases = client.shop["_event_leases"]
        renewed = {
            d["_id"]: d["renewed_at"] for d in leases.find({"_id": {"$regex": "^db:.*#"}})
        }  # the partitions
        assert len(renewed) == 2
        assert wait_for(  # and a renewal of every partition's lease (every lease_ttl / 3)
            lambda: all(leases.find_one({"_id": k})["renewed_at"] > t for k, t in renewed.items()), timeout=10
        ), renewed
        client.shop.users.insert_one({"_id": "last"})
        assert wait_for(lambda: ("users", "last", 0) in got.snapshot(), timeout=10), got.snapshot()
        assert sorted((c, str(d)) for c, d, _ in got.snapshot()) == sorted(
            [("orders", str(i)) for i in range(10)] + [("users", "u"), ("users", "last")]
        )
    finally:
        bus.stop(timeout=5)


@pytest.mark.parametrize("mode", ["server", "client"])
def test_events_without_a_document_key_go_to_partition_0_and_every_partition_continues(
    members: Callable[..., me.Bus],
    client: pymongo.MongoClient[Any],
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if mode == "client":
        monkeypatch.setattr(group_runtime, "server_supports_hashed_keys", lambda coll: False)
    got: list[tuple[str, Any]] = []
    lock = threading.Lock()
    bus = members("solo", Log(), partitions=3)

    @bus.subscribe(name="ops")
    def ops(event: me.ChangeEvent) -> None:
        with lock:
            got.append((event.operation_type.value, (event.document_key or {}).get("_id")))

    bus.start()
    coll = client.shop.orders
    for i in range(6):
        coll.insert_one({"_id": i})
    assert wait_for(lambda: len([g for g in got if g[0] == "insert"]) == 6, timeout=10), got
    coll.drop()
    for i in range(6, 12):  # after the invalidate, every partition's stream continues
        coll.insert_one({"_id": i})
    assert wait_for(lambda: len([g for g in got if g[0] == "insert"]) == 12, timeout=15), got
    assert bus.flush()
    with lock:
        seen = list(got)
    assert sorted(d for op, d in seen if op == "insert") == list(range(12))
    assert [op for op, _ in seen].count("drop") == 1  # partition 0 only


def test_the_published_status_names_the_group_and_the_partitions_held(
    members: Callable[..., me.Bus],
) -> None:
    from mongo_events.monitor import MemoryConsumerStatusStore, StatusPublisher

    store = MemoryConsumerStatusStore()
    members("published", Log(), status=StatusPublisher(store, interval=0.05)).start()

    def published() -> tuple[str | None, tuple[int, ...]] | None:
        found = [c for c in store.list() if c.bus == "published"]
        return (found[0].group, tuple(found[0].partitions)) if found else None

    # Every partition, once the member holds them all (a lease call that timed out on a
    # loaded machine is taken at a later poll, and the next status names it)
    assert wait_for(lambda: published() == ("billing", (0, 1, 2, 3)), timeout=10), published()


def test_checkpoint_operations_act_on_every_partition_key(
    members: Callable[..., me.Bus], client: pymongo.MongoClient[Any]
) -> None:
    log = Log()
    bus = members("ops", log, partitions=3)
    assert bus.checkpoint_keys == [f"billing:shop.orders#{p}" for p in range(3)]
    bus.start()
    for i in range(10):
        client.shop.orders.insert_one({"_id": i, "v": 0})
    assert wait_for(lambda: len(log.snapshot()) == 10, timeout=10), log.snapshot()
    bus.stop()
    tokens = client.shop["_event_resume_tokens"]
    assert {d["_id"] for d in tokens.find({"_id": {"$regex": "^billing:"}})} == set(bus.checkpoint_keys)
    bus.reset_resume_token()
    # Each key now holds "from now" (a partition without a checkpoint would start where the
    # group began and replay these ten).
    again = Log()
    second = members("ops2", again, partitions=3)
    second.start()
    client.shop.orders.insert_one({"_id": 10, "v": 0})
    assert wait_for(lambda: [d for _, d, _ in again.snapshot()] == [10], timeout=10), again.snapshot()
    second.stop()
    assert [d for _, d, _ in again.snapshot()] == [10]
    plain = me.Bus(client.shop.orders, resume_token_id="x")
    assert plain.checkpoint_keys == ["shop.orders:x"]


def test_a_partition_without_a_checkpoint_starts_where_the_group_began(
    members: Callable[..., me.Bus], client: pymongo.MongoClient[Any]
) -> None:
    # A first member joined the group and died before any partition wrote a checkpoint; the
    # changes made since must still be delivered (from "now" they would be lost).
    from mongo_events.groups import GroupConfig, MongoLeaseStore, PartitionMode

    leases = MongoLeaseStore(client.shop["_event_leases"])
    mode = (
        PartitionMode.SERVER
        if group_runtime.server_supports_hashed_keys(client.shop.orders)
        else PartitionMode.CLIENT
    )
    joined = leases.join_group(GroupConfig("billing", 2, mode, namespace="shop.orders"))
    assert joined.started_at is not None
    client.shop.orders.insert_many([{"_id": i, "v": 0} for i in range(20)])
    log = Log()
    bus = members("late", log, partitions=2)
    bus.start()
    assert wait_for(lambda: len(log.snapshot()) >= 20, timeout=10), log.snapshot()
    assert sorted(d for _, d, _ in log.snapshot()) == list(range(20))


def test_a_rebalance_with_blocked_callbacks_keeps_the_other_leases(
    client: pymongo.MongoClient[Any], caplog: pytest.LogCaptureFixture
) -> None:
    # Given a member whose callbacks block, one event in each of its 8 partitions
    release = threading.Event()
    started = Log()
    buses = []

    def make(name: str) -> me.Bus:
        bus = me.Bus(client.shop.orders, **FAST, group="slow", partitions=8, lease_ttl=3.0, name=name)

        @bus.subscribe
        def blocked(event: me.ChangeEvent) -> None:
            started.add(name, event.document_key["_id"], 0)
            release.wait(10)

        buses.append(bus)
        return bus

    caplog.set_level(logging.WARNING, logger="mongo_events.groups")
    first = make("first").start()
    try:
        assert wait_for(lambda: held(first) == set(range(8)), timeout=10.0)
        ids = {}
        i = 0
        while len(ids) < 8:  # one document per partition
            ids.setdefault(partition_of(i, 8), i)
            i += 1
        for doc in ids.values():
            client.shop.orders.insert_one({"_id": doc})
        assert wait_for(lambda: len(started.snapshot()) == 8, timeout=10)
        # When a second member joins, the first releases four partitions whose callbacks never return
        second = make("second").start()
        assert wait_for(lambda: spread([first, second], 8), timeout=10), (held(first), held(second))
        # Then the four releases took ttl / 6 together (one at a time, each waiting for its
        # callbacks, they would hold the member's thread past the give-up time of its other
        # leases), and the first kept (renewed) its other leases
        assert not [r for r in caplog.records if "gives up partition" in r.getMessage()]
        assert first.health().group.rebalances == 2  # type: ignore[union-attr]
    finally:
        release.set()
        for bus in buses:
            try:
                bus.stop(timeout=5)
            except me.ShutdownTimeout:
                pass


def test_changing_a_group_s_partitions_as_the_readme_says_loses_nothing(
    members: Callable[..., me.Bus],
    client: pymongo.MongoClient[Any],
    fake_rs: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # README "Changing a group's partitions", step by step, from 2 partitions to 3.
    from bson import json_util

    from mongo_events.cli import main

    def cli(*argv: str) -> tuple[int, list[Any]]:
        code = main(["tokens", *argv, "--uri", fake_rs.uri, "--db", "shop"])
        out = capsys.readouterr().out
        return code, [json_util.loads(line) for line in out.splitlines() if line.strip()]

    log = Log()
    old = members("old", log, partitions=2)
    old.start()
    client.shop.orders.insert_many([{"_id": i, "v": 0} for i in range(10)])
    assert wait_for(lambda: len(log.snapshot()) == 10, timeout=10), log.snapshot()
    old.stop()  # 1. stop every member
    client.shop.orders.insert_many([{"_id": i, "v": 0} for i in range(10, 20)])  # while stopped
    with pytest.raises(GroupMismatch, match="Changing a group's partitions"):
        members("refused", Log(), partitions=3).start()
    # 2. the oldest checkpoint of the group's partitions
    code, shown = cli("show")
    times = [d["cluster_time"] for d in shown if d["key"].startswith("billing:shop.orders#")]
    assert code == 0 and len(times) == 2, shown
    oldest = datetime.fromtimestamp(min(times).time, timezone.utc).isoformat().replace("+00:00", "Z")
    # 3. delete the group document
    assert client.shop["_event_leases"].delete_one({"_id": "group:billing:shop.orders"}).deleted_count == 1
    # 4. every new partition restarts at that time
    for p in range(3):
        assert cli("rewind", "--key", f"billing:shop.orders#{p}", "--to", oldest, "--yes")[0] == 0
    # 5. start the members with the new count
    again = Log()
    members("new", again, partitions=3).start()
    assert wait_for(lambda: {d for _, d, _ in again.snapshot()} >= set(range(10, 20)), timeout=15), (
        again.snapshot()
    )
    doc = client.shop["_event_leases"].find_one({"_id": "group:billing:shop.orders"})
    assert doc is not None and doc["partitions"] == 3
