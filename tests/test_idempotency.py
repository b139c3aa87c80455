"""Exactly-once effects on a bus: Skip from middleware, idempotency= with its claim protocol."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pymongo
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import mongo_events as me
from mongo_events.idempotency.guard import ClaimedElsewhere, CrashCounter

from .conftest import wait_for
from .helpers import QUICK, Recorder
from .test_metrics_and_health import points


class SkipOdd(me.Middleware):
    """Skips deliveries of odd document ids; records what it saw."""

    def __init__(self) -> None:
        self.skipped: list[tuple[Any, str]] = []
        self.after: list[Any] = []

    def before_delivery(self, delivery: me.Delivery) -> None:
        if delivery.event.document_id % 2:
            raise me.Skip("odd")

    def after_delivery(self, delivery: me.Delivery, error: BaseException | None, duration: float) -> None:
        self.after.append(delivery.event.document_id)

    def after_delivery_skipped(self, delivery: me.Delivery, skip: me.Skip) -> None:
        self.skipped.append((delivery.event.document_id, skip.reason))


class Plain(me.Middleware):
    """Knows nothing of skipping: its before and after hooks are recorded."""

    def __init__(self) -> None:
        self.before: list[Any] = []
        self.after: list[tuple[Any, Any]] = []

    def before_delivery(self, delivery: me.Delivery) -> None:
        self.before.append(delivery.event.document_id)

    def after_delivery(self, delivery: me.Delivery, error: BaseException | None, duration: float) -> None:
        self.after.append((delivery.event.document_id, error))


def test_middleware_skip_finishes_the_delivery_without_the_callback(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    outer, skipper, inner = Plain(), SkipOdd(), Plain()
    letters = me.MemoryDeadLetterStore()
    bus = make_bus(client.shop.orders, middleware=[outer, skipper, inner], dead_letters=letters)
    rec = Recorder()
    bus.subscribe(lambda ev: rec.add(ev.document_id), name="handle", max_retries=3, retry_backoff=QUICK)
    bus.start()
    client.shop.orders.insert_many([{"_id": i} for i in range(6)])
    assert wait_for(lambda: len(outer.after) == 6, 10), outer.after
    assert bus.join(10)
    assert sorted(rec.items) == [0, 2, 4]  # odd ones never reached the callback
    assert sorted(skipper.skipped) == [(1, "odd"), (3, "odd"), (5, "odd")]  # once each: not retried
    assert sorted(inner.before) == [0, 2, 4]  # later middleware never saw the skipped ones
    # A middleware that knows nothing of skipping sees a skipped delivery as a successful one.
    assert sorted(outer.after) == [(i, None) for i in range(6)]
    assert letters.count() == 0 and bus.state is me.BusState.RUNNING
    assert bus.flush() and bus.in_flight == 0  # skipped events are done: the checkpoint passes them


def _two_buses_on_one_store(
    client: pymongo.MongoClient[Any], make_bus: Any, **options: Any
) -> tuple[me.Bus, me.Bus]:
    return tuple(  # type: ignore[return-value]
        make_bus(
            client.shop.orders,
            resume_token_store=me.MemoryResumeTokenStore(),
            start_from_past=timedelta(hours=1),
            **options,
        )
        for _ in range(2)
    )


def test_a_replayed_stream_runs_each_effect_once(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    store = me.MemoryIdempotencyStore()
    client.shop.orders.insert_many([{"_id": i} for i in range(5)])
    effects = Recorder()
    first, second = _two_buses_on_one_store(
        client, make_bus, idempotency=store, metrics=me.Metrics(meter_provider=provider)
    )
    for bus in (first, second):
        bus.subscribe(lambda ev: effects.add(ev.document_id), name="effect")
    first.start()
    effects.wait(5)
    assert first.join(10)
    first.stop()
    # The second bus reads the same five events (a replay): every one is a duplicate.
    second.start()
    guard = second.subscriptions[0].idempotency
    assert guard is not None
    assert wait_for(lambda: guard.duplicates == 5, 10), guard.duplicates
    assert second.join(10)
    assert sorted(effects.items) == [0, 1, 2, 3, 4]
    dup = points(reader)["mongodb.changes.duplicates"]
    assert sum(v for _, v, _ in dup) == 5 and dup[0][0]["event"] == "effect"
    provider.shutdown()


def test_a_failed_attempt_releases_its_claim_so_the_retry_runs(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    store = me.MemoryIdempotencyStore()
    bus = make_bus(client.shop.orders)
    calls = Recorder()
    ids: list[str] = []

    @bus.subscribe(name="flaky", idempotency=store, max_retries=3, retry_backoff=QUICK)
    def flaky(ev: me.ChangeEvent, delivery: me.Delivery) -> None:
        ids.append(ev.id)
        calls.add(delivery.attempt)
        if delivery.attempt == 1:
            raise ConnectionError("down")

    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    assert calls.wait(2) == [1, 2]
    assert bus.join(10)
    assert store.try_claim(f"flaky:{ids[0]}", timedelta(minutes=1)).status is me.ClaimStatus.COMPLETED


def test_a_key_held_elsewhere_waits_without_spending_attempts(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    store = me.MemoryIdempotencyStore()
    bus = make_bus(client.shop.orders)
    calls = Recorder()
    asked = threading.Event()

    class Key:
        def __call__(self, event: me.ChangeEvent) -> str:
            asked.set()
            return f"order-{event.document_id}"

    guard = me.Idempotency(store, key=Key(), processing_ttl=timedelta(milliseconds=100))
    bus.subscribe(lambda ev, d: calls.add(d.attempt), name="held", idempotency=guard, max_retries=0)
    assert store.claim("held:order-7", timedelta(minutes=5))  # another process is on it
    bus.start()
    client.shop.orders.insert_one({"_id": 7})
    assert asked.wait(10)
    assert len(calls) == 0
    store.release("held:order-7")  # ... and failed: the redelivery here must run it
    assert calls.wait(1, timeout=10) == [1]  # not counted as attempts: max_retries=0 was no obstacle
    assert bus.join(10)
    assert not store.claim("held:order-7", timedelta(minutes=1))


class BrokenStore(me.MemoryIdempotencyStore):
    def try_claim(self, key: str, processing_ttl: timedelta) -> me.Claim:
        raise me.StoreError("store down")


def test_a_failed_claim_fails_open_by_default(
    client: pymongo.MongoClient[Any], make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    guard = me.Idempotency(BrokenStore())
    bus = make_bus(client.shop.orders)
    calls = Recorder()
    bus.subscribe(lambda ev: calls.add(ev.document_id), idempotency=guard, name="open")
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    assert calls.wait(1) == [1]
    assert bus.join(10)
    assert guard.claim_failures == 1
    assert "failing open" in caplog.text


def test_a_failed_claim_with_fail_closed_is_a_failed_attempt(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    letters = me.MemoryDeadLetterStore()
    guard = me.Idempotency(BrokenStore(), fail_closed=True)
    bus = make_bus(client.shop.orders, dead_letters=letters)
    calls = Recorder()
    bus.subscribe(
        lambda ev: calls.add(ev.document_id),
        idempotency=guard,
        name="closed",
        max_retries=2,
        retry_backoff=QUICK,
    )
    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    assert wait_for(lambda: letters.count() == 1, 10)
    assert len(calls) == 0 and guard.claim_failures == 3  # first attempt and two retries
    (letter,) = letters.list()
    assert (
        letter.event_name == "closed" and "StoreError" in letter.error and letter.retry_count == 2
    )  # retries after the first


def test_the_bus_store_applies_to_every_subscription_unless_one_brings_its_own(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    shared, own = me.MemoryIdempotencyStore(), me.MemoryIdempotencyStore()
    bus = make_bus(client.shop.orders, idempotency=shared)
    bus.subscribe(lambda ev: None, name="a")
    bus.subscribe(lambda ev: None, name="b", idempotency=own)
    a, b = bus.subscriptions
    assert a.idempotency is not None and a.idempotency.store is shared
    assert b.idempotency is not None and b.idempotency.store is own
    with pytest.raises(me.ConfigurationError, match="idempotency"):
        bus.subscribe(lambda ev: None, name="c", idempotency="redis://")


def test_a_key_started_max_crashes_times_without_finishing_is_a_poison_event() -> None:
    store = me.MemoryIdempotencyStore()
    guard = me.Idempotency(store, processing_ttl=timedelta(milliseconds=20), max_crashes=2)
    event = me.ChangeEvent.from_raw(
        {
            "_id": {"_data": "82BB"},
            "operationType": "insert",
            "ns": {"db": "d", "coll": "c"},
            "documentKey": {"_id": 1},
        }
    )
    for _ in range(2):  # two lives that died inside the handler: claimed, never finished
        assert wait_for(lambda: store.claim("sub:82BB", timedelta(milliseconds=20)), 5)

    def attempt() -> object:
        try:
            return guard.claim(event, "sub")  # a key: the handler would run
        except ClaimedElsewhere:
            return None  # the last dead life's claim has not expired yet
        except me.PoisonEvent as exc:
            return exc

    poison = wait_for(attempt, 5)
    assert isinstance(poison, me.PoisonEvent) and isinstance(poison, me.Reject), poison
    assert poison.crashes == 2 and "crashed the process 2 times" in str(poison)
    assert guard.poisoned == 1
    assert store.try_claim("sub:82BB", timedelta(minutes=1)).starts == 1  # reset: a replay starts afresh


def test_an_event_in_flight_during_a_crash_runs_alone(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    store = me.MemoryIdempotencyStore()
    bus = make_bus(
        client.shop.orders,
        max_workers=4,
        idempotency=me.Idempotency(store, processing_ttl=timedelta(seconds=5)),
    )
    running: set[Any] = set()
    overlaps: list[tuple[Any, frozenset[Any]]] = []
    lock = threading.Lock()
    ids: dict[Any, str] = {}
    done = Recorder()
    pause = threading.Event()  # never set: a timed wait makes handlers overlap

    @bus.subscribe(name="h")
    def handle(ev: me.ChangeEvent) -> None:
        with lock:
            ids[ev.document_id] = ev.id
            if running and (ev.document_id == 3 or 3 in running):
                overlaps.append((ev.document_id, frozenset(running)))
            running.add(ev.document_id)
        pause.wait(0.02)
        with lock:
            running.discard(ev.document_id)
        done.add(ev.document_id)

    bus.start()
    client.shop.orders.insert_many([{"_id": i} for i in range(6)])
    done.wait(6)
    assert bus.join(10)
    bus.stop()
    # Given: every key forgotten, and event 3 in flight when the process died (claimed, never finished).
    for i in range(6):
        store.remove(f"h:{ids[i]}")
    assert store.claim(f"h:{ids[3]}", timedelta(milliseconds=1))
    running.clear()
    overlaps.clear()
    # When: the same events are delivered again (a replay).
    replay = make_bus(
        client.shop.orders,
        max_workers=4,
        resume_token_store=me.MemoryResumeTokenStore(),
        start_from_past=timedelta(hours=1),
        idempotency=me.Idempotency(store),
    )
    replay.subscribe(handle, name="h")
    replay.start()
    done.wait(12)
    # Then: event 3 ran with nothing beside it, and everything ran again.
    assert sorted(done.items[6:]) == list(range(6))
    assert overlaps == []
    assert store.try_claim(f"h:{ids[3]}", timedelta(minutes=1)).status is me.ClaimStatus.COMPLETED


def test_a_suspect_waits_a_bounded_time_to_run_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from mongo_events.idempotency import guard as guard_module

    monkeypatch.setattr(guard_module, "ALONE_WAIT", 0.2)
    gate = guard_module._Isolation()
    assert gate.enter(False) is False  # a long callback is running
    outcome: list[bool] = []
    suspect = threading.Thread(target=lambda: outcome.append(gate.enter(True)))
    suspect.start()
    suspect.join(10)
    assert outcome == [False]  # it gave up waiting and runs beside the long one
    assert gate.enter(False) is False  # nobody is left waiting: new deliveries go on
    for _ in range(3):
        gate.leave(False)
    assert gate.enter(True) is True  # with nothing running, a suspect runs alone
    gate.leave(True)


def test_a_hung_suspect_holds_other_deliveries_back_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from mongo_events.idempotency import guard as guard_module

    monkeypatch.setattr(guard_module, "ALONE_WAIT", 0.2)
    gate = guard_module._Isolation()
    assert gate.enter(True) is True  # a suspect runs alone, and hangs (never leaves)
    passed = threading.Event()

    def bystander() -> None:
        gate.enter(False)
        passed.set()

    with caplog.at_level("WARNING", logger="mongo_events.idempotency.guard"):
        threading.Thread(target=bystander, daemon=True).start()
        assert passed.wait(10), "a bystander waited for a hung suspect with no bound"
    assert "runs beside it" in caplog.text or "run beside it" in caplog.text
    # The hold is bounded too: once it is over, new deliveries do not wait at all.
    assert gate.enter(False) is False
    gate.leave(True)


class _Id:
    def __init__(self, id: str) -> None:
        self.id = id


def test_replicas_running_one_event_at_once_are_not_crashes() -> None:
    store = me.MemoryIdempotencyStore()
    replicas = [CrashCounter(store, max_crashes=3) for _ in range(5)]
    event: Any = _Id("evt1")
    keys: list[object] = []
    errors: list[BaseException] = []
    gap = threading.Event()  # never set: the time between the replicas' deliveries
    for counter in replicas:  # one after another, while the first still runs
        try:
            keys.append(counter.claim(event, "handle"))
        except BaseException as exc:
            errors.append(exc)
        gap.wait(0.01)
    assert errors == []  # no replica dead-letters a healthy event as "crashed the process"
    counted = [k for k in keys if k is not None]
    assert counted == ["crash:handle:evt1"]  # one holds the live claim, the others run uncounted
    for r, k in zip(replicas, keys, strict=True):
        if k is not None:
            r.finish(k, None)
    # A finished run forgets the key: the next start is the first again.
    assert store.try_claim("crash:handle:evt1", timedelta(minutes=1)).starts == 1


def test_a_crash_counter_counts_a_start_whose_claim_expired_unfinished() -> None:
    store = me.MemoryIdempotencyStore()
    for _ in range(3):  # three lives died inside the handler: their claims expired unfinished
        assert wait_for(lambda: store.claim("crash:handle:evt1", timedelta(milliseconds=20)), 5)
    counter = CrashCounter(store, max_crashes=3)

    def attempt() -> object:
        try:
            return counter.claim(_Id("evt1"), "handle")  # type: ignore[arg-type]
        except me.PoisonEvent as exc:
            return exc

    def poisoned() -> object:
        outcome = attempt()
        return outcome if isinstance(outcome, me.PoisonEvent) else None

    poison = wait_for(poisoned, 5)
    assert isinstance(poison, me.PoisonEvent) and poison.crashes == 3


class _ReleaseFailsOnce(me.MemoryIdempotencyStore):
    def __init__(self) -> None:
        super().__init__()
        self.claims = 0
        self.failed = False

    def try_claim(self, key: str, processing_ttl: timedelta) -> me.Claim:
        self.claims += 1
        return super().try_claim(key, processing_ttl)

    def release(self, key: str) -> None:
        if not self.failed:
            self.failed = True
            raise me.StoreError("the store blinked")
        super().release(key)


def _event(n: int) -> me.ChangeEvent:
    from bson import Timestamp

    return me.ChangeEvent.from_raw(
        {
            "_id": {"_data": f"82{n:014X}"},
            "operationType": "insert",
            "ns": {"db": "shop", "coll": "orders"},
            "documentKey": {"_id": n},
            "fullDocument": {"_id": n},
            "clusterTime": Timestamp(1_700_000_000, n),
        }
    )


def _unreleased_claim(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[list[float], _ReleaseFailsOnce, me.Idempotency, me.ChangeEvent, str]:
    """A guard on a hand-moved clock whose first claim's release failed: the claim stays its own."""
    from mongo_events.idempotency import guard as guard_module

    now = [1000.0]
    monkeypatch.setattr(guard_module, "_clock", lambda: now[0])
    store = _ReleaseFailsOnce()
    guard = me.Idempotency(store, processing_ttl=timedelta(seconds=60))
    event = _event(1)
    key = guard.claim(event, "charge")
    assert key is not None and store.claims == 1
    guard.finish(key, RuntimeError("handler failed"))  # its release fails: the claim stays ours
    assert guard.finish_failures == 1
    return now, store, guard, event, key


@pytest.mark.parametrize("later", [False, True])
def test_a_retry_after_a_failed_release_runs_under_its_claim_only_while_it_surely_holds(
    later: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    now, store, guard, event, key = _unreleased_claim(monkeypatch)
    now[0] += 40.0 if later else 1.0
    if not later:  # soon after: the retry runs under the claim it still holds
        assert guard.claim(event, "charge") == key and store.claims == 1
        guard.finish(key, None)
        with pytest.raises(me.Duplicate):
            guard.claim(event, "charge")
    else:  # the claim may expire mid-callback: the retry claims again and waits its turn
        with pytest.raises(ClaimedElsewhere):
            guard.claim(event, "charge")
        assert store.claims == 2


def test_a_retry_after_a_failed_release_judges_its_claim_after_waiting_for_its_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mongo_events.idempotency import guard as guard_module

    now, store, guard, event, _key = _unreleased_claim(monkeypatch)

    class SlowTurn(guard_module._Isolation):
        """A suspect runs alone: the turn comes a whole hold later."""

        def enter(self, alone: bool) -> bool:
            now[0] += 60.0
            return super().enter(alone)

    monkeypatch.setattr(guard_module, "_ISOLATION", SlowTurn())
    # Given: the retry comes soon (well within half the hold) ...
    now[0] += 1.0
    # When: ... but its turn to run comes after the claim expired.
    outcome: object
    try:
        outcome = guard.claim(event, "charge")
    except ClaimedElsewhere as exc:
        outcome = exc
    # Then: it claims again instead of running under the expired claim.
    assert store.claims == 2, "the retry ran under a claim that expired while it waited for its turn"
    assert isinstance(outcome, ClaimedElsewhere)


class _ReleaseAlwaysFails(me.MemoryIdempotencyStore):
    """A blinking store: every release fails, so every failed attempt leaves its start counted."""

    def release(self, key: str) -> None:
        raise me.StoreError("the store blinked")


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """One clock for the guard and the memory store (moved by hand), and a fresh isolation gate."""
    import types

    from mongo_events.idempotency import guard as guard_module
    from mongo_events.idempotency import memory as memory_module

    now = [1000.0]
    monkeypatch.setattr(guard_module, "_clock", lambda: now[0])
    monkeypatch.setattr(memory_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(guard_module, "_ISOLATION", guard_module._Isolation())
    return now


def _attempts(guard: me.Idempotency, event: Any, now: list[float], step: float, n: int) -> list[str]:
    """``n`` failed attempts of ``event``, the clock moved by ``step`` after each: what each did."""
    outcomes: list[str] = []
    for _ in range(n):
        try:
            key = guard.claim(event, "charge")
        except (ClaimedElsewhere, me.PoisonEvent) as exc:
            outcomes.append(type(exc).__name__)
        else:
            outcomes.append("ran" if key is not None else "uncounted")
            guard.finish(key, RuntimeError("handler failed"))
        now[0] += step
    return outcomes


@pytest.mark.parametrize("step", [31.0, 61.0])  # past half the hold; past the whole hold
def test_failed_attempts_whose_release_fails_are_never_counted_as_crashes(
    step: float, frozen: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    guard = me.Idempotency(_ReleaseAlwaysFails(), processing_ttl=timedelta(seconds=60), max_crashes=3)
    with caplog.at_level("WARNING", logger="mongo_events.idempotency.guard"):
        outcomes = _attempts(guard, _event(1), frozen, step, 10)
    assert "PoisonEvent" not in outcomes and guard.poisoned == 0, outcomes
    assert "was in flight when the process died" not in caplog.text  # never suspected, never alone
    if step > 60:  # each retry finds the last claim expired and takes a fresh one
        assert outcomes == ["ran"] * 10
    else:  # every other retry finds this process's own unreleased claim still live, and waits
        assert outcomes == ["ran", "ClaimedElsewhere"] * 5
    assert guard.finish_failures == outcomes.count("ran")


def test_a_crash_counter_never_counts_its_failed_releases_as_crashes(
    frozen: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    counter = CrashCounter(_ReleaseAlwaysFails(), max_crashes=3, processing_ttl=timedelta(seconds=60))
    with caplog.at_level("WARNING", logger="mongo_events.idempotency.guard"):
        outcomes = _attempts(counter, _Id("evt1"), frozen, 61.0, 10)
    assert outcomes == ["ran"] * 10  # every start counted, none a crash
    assert counter.poisoned == 0
    assert "was in flight when the process died" not in caplog.text
    assert "may count as a crash" not in caplog.text


def test_a_retry_under_its_unreleased_claim_that_releases_it_leaves_nothing_uncounted(
    frozen: list[float],
) -> None:
    store = _ReleaseFailsOnce()
    guard = me.Idempotency(store, processing_ttl=timedelta(seconds=60), max_crashes=1)
    event = _event(1)
    key = guard.claim(event, "charge")
    assert key is not None
    guard.finish(key, RuntimeError("handler failed"))  # the release fails: the start stays counted
    frozen[0] += 1.0
    assert guard.claim(event, "charge") == key  # the retry runs under that claim ...
    guard.finish(key, RuntimeError("failed again"))  # ... and releases it: the store uncounted it
    # Given: another process then dies inside the handler (its start stays counted).
    other = me.Idempotency(store, processing_ttl=timedelta(seconds=60), max_crashes=1)
    assert other.claim(event, "charge") == key
    frozen[0] += 61.0
    # Then: that crash counts here in full; nothing of this process's is subtracted from it.
    with pytest.raises(me.PoisonEvent, match="crashed the process 1 times"):
        guard.claim(event, "charge")


def test_starts_left_unfinished_by_restarted_processes_still_count_as_crashes(
    frozen: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mongo_events.idempotency import guard as guard_module

    store = me.MemoryIdempotencyStore()
    event = _event(1)
    # Given: three lives that died inside the handler, each a fresh guard (a restarted process).
    for life in range(3):
        monkeypatch.setattr(guard_module, "_ISOLATION", guard_module._Isolation())  # a fresh process
        dead = me.Idempotency(store, processing_ttl=timedelta(seconds=60), max_crashes=3)
        assert dead.claim(event, "charge") is not None, life  # it runs (alone after the first) ...
        frozen[0] += 61.0  # ... and dies: its claim expires unfinished
    # When: the next life claims it.
    monkeypatch.setattr(guard_module, "_ISOLATION", guard_module._Isolation())
    guard = me.Idempotency(store, processing_ttl=timedelta(seconds=60), max_crashes=3)
    # Then: it is a poison event.
    with pytest.raises(me.PoisonEvent, match="crashed the process 3 times") as poison:
        guard.claim(event, "charge")
    assert poison.value.crashes == 3 and guard.poisoned == 1


@pytest.mark.parametrize("counter", [False, True])
def test_crashes_elsewhere_count_in_full_beside_a_failed_release_here(
    counter: bool, frozen: list[float]
) -> None:
    store = _ReleaseFailsOnce()
    ttl = timedelta(seconds=60)
    guard = CrashCounter(store, processing_ttl=ttl) if counter else me.Idempotency(store, processing_ttl=ttl)
    event = _event(1)
    key = guard.claim(event, "charge")
    assert key is not None
    guard.finish(key, RuntimeError("handler failed"))  # its release fails: a start that is no crash
    for _ in range(3):  # Given: then three other processes died inside the handler
        frozen[0] += 61.0
        assert store.claim(key, ttl)
    frozen[0] += 61.0
    # When / Then: this process subtracts its own start, and counts the three crashes.
    with pytest.raises(me.PoisonEvent, match="crashed the process 3 times") as poison:
        guard.claim(event, "charge")
    assert poison.value.crashes == 3 and guard.poisoned == 1


def test_a_key_removed_elsewhere_is_counted_afresh(frozen: list[float]) -> None:
    store = _ReleaseAlwaysFails()
    guard = me.Idempotency(store, processing_ttl=timedelta(seconds=60), max_crashes=1)
    event = _event(1)
    assert _attempts(guard, event, frozen, 61.0, 2) == ["ran", "ran"]  # two starts left counted
    key = guard.key_for(event, "charge")
    store.remove(key)  # another process dead-lettered it, and it was replayed
    assert _attempts(guard, event, frozen, 61.0, 1) == ["ran"]  # not below one start
    # Given: another process then dies inside the handler.
    assert store.claim(key, timedelta(seconds=60))
    frozen[0] += 61.0
    # Then: its crash counts: this process subtracts only its one start since the removal.
    with pytest.raises(me.PoisonEvent, match="crashed the process 1 times"):
        guard.claim(event, "charge")


def test_keys_remembered_for_failed_releases_are_bounded(
    frozen: list[float], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from mongo_events.idempotency import guard as guard_module

    monkeypatch.setattr(guard_module, "_REMEMBERED_KEYS", 2)
    guard = me.Idempotency(_ReleaseAlwaysFails(), processing_ttl=timedelta(seconds=60))
    for n in (1, 2, 3):  # three events dead-lettered after an attempt whose release failed
        key = guard.claim(_event(n), "charge")
        guard.finish(key, RuntimeError("handler failed"))
    kept = [guard.key_for(_event(n), "charge") for n in (2, 3)]
    assert list(guard._uncounted) == kept and list(guard._held) == kept  # the oldest is forgotten
    # A forgotten key gets the behaviour of a process that never saw its release fail.
    frozen[0] += 61.0
    with caplog.at_level("WARNING", logger="mongo_events.idempotency.guard"):
        with pytest.raises(ClaimedElsewhere):  # a suspect; its second claim meets its own live one
            guard.claim(_event(1), "charge")
    assert "was in flight when the process died 1 time(s)" in caplog.text
