"""The monitor through the bus, and its HTTP API through a WSGI test client."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit
from wsgiref.util import setup_testing_defaults

import pymongo
import pytest

import mongo_events as me
from mongo_events.monitor import (
    MemoryMonitorStore,
    MongoMonitorStore,
    MonitorEntry,
    MonitorMiddleware,
    MonitorStatus,
    MonitorStore,
    parse_duration,
    wsgi_app,
)
from mongo_events.monitor.records import now_ms, parse_rfc3339, rfc3339

from .conftest import wait_for
from .helpers import QUICK, Recorder, change_event


class Client:
    """A minimal WSGI test client: ``get``/``delete``/``post`` return (status code, JSON body)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.token = ""

    def request(self, method: str, url: str, csrf: bool = True) -> tuple[int, Any, dict[str, str]]:
        parts = urlsplit(url)
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "PATH_INFO": parts.path,
            "QUERY_STRING": parts.query,
        }
        if csrf and method not in ("GET", "HEAD"):  # as an API client does: the cookie's value in a header
            if not self.token:
                self.token = self.get("/v1/csrf")[1]["token"]
            environ.update(HTTP_COOKIE=f"mongo_events_csrf={self.token}", HTTP_X_CSRF_TOKEN=self.token)
        setup_testing_defaults(environ)
        captured: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            captured["status"] = int(status.split(maxsplit=1)[0])
            captured["headers"] = dict(headers)

        body = b"".join(self.app(environ, start_response))
        assert captured["headers"]["Content-Type"] == "application/json"
        return captured["status"], json.loads(body), captured["headers"]

    def get(self, url: str) -> tuple[int, Any]:
        return self.request("GET", url)[:2]

    def delete(self, url: str) -> tuple[int, Any]:
        return self.request("DELETE", url)[:2]


# -- the monitor through the bus ---------------------------------------------------------------


def test_entries_follow_each_delivery(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    store = MongoMonitorStore(client.internal)
    seen = Recorder()
    letters = me.MemoryDeadLetterStore()
    # No flusher ticks during the test: the monitor writes only when asked, so batching is visible.
    bus = make_bus(client.shop.orders, monitor=store, dead_letters=letters, flush_interval=3600)
    failures: dict[int, int] = {}

    @bus.subscribe(name="orders", max_retries=2, retry_backoff=QUICK)
    def handle(ev: me.ChangeEvent) -> None:
        key = ev.document_id
        if key in (2, 3):
            failures[key] = failures.get(key, 0) + 1
            if key == 3 or failures[key] == 1:
                raise ValueError(f"cannot handle {key}")
        seen.add(key)

    bus.start()
    client.shop.orders.insert_many([{"_id": i} for i in (1, 2, 3)])
    assert wait_for(lambda: letters.count() == 1)
    seen.wait(2)
    assert bus.join(5) and bus.flush()
    entries = {int(e.metadata["document_key"]): e for e in store.list().entries}  # Go's key format
    assert (
        entries[1].status is MonitorStatus.COMPLETED
        and entries[1].retry_count == 0
        and entries[1].error is None
    )
    assert entries[2].status is MonitorStatus.COMPLETED and entries[2].retry_count == 1
    assert entries[2].error == "ValueError: cannot handle 2"  # kept after the later success
    assert entries[3].status is MonitorStatus.FAILED and entries[3].retry_count == 2
    # retry_count means retries in both records of the event that was given up on.
    (letter,) = letters.list()
    assert letter.original_id == entries[3].event_id and letter.retry_count == entries[3].retry_count == 2
    for e in entries.values():
        assert e.subscription_id == "orders" and e.event_name == "shop.orders" and e.bus_id == bus.name
        assert e.completed_at is not None and e.duration_ms is not None and e.instance_id
        assert e.duration_ms == (e.completed_at - e.started_at) / timedelta(milliseconds=1)
        assert e.metadata["operation"] == "insert"
    assert store.stuck_pending_count(timedelta(0)) == 0
    # Batched: the dozen lifecycle changes went out in the one write that flush() asked for.
    assert bus.monitor is not None and bus.monitor.writes == 1


def test_a_running_callback_shows_as_pending(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    store = MemoryMonitorStore()
    release = threading.Event()
    started = Recorder()
    bus = make_bus(client.shop.orders, monitor=store)

    @bus.subscribe
    def slow(ev: me.ChangeEvent) -> None:
        started.add(ev.id)
        release.wait(10)

    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    (event_id,) = started.wait(1)
    assert wait_for(lambda: store.count() == 1)
    (entry,) = store.get_by_event_id(event_id)
    assert entry.status is MonitorStatus.PENDING and entry.completed_at is None
    release.set()
    assert wait_for(lambda: (store.get_by_event_id(event_id) or [entry])[0].status is MonitorStatus.COMPLETED)


def test_an_exhausted_event_that_stops_the_bus_is_recorded_failed(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    store = MemoryMonitorStore()
    bus = make_bus(client.shop.orders, monitor=store)

    @bus.subscribe(max_retries=0)
    def fail(ev: me.ChangeEvent) -> None:
        raise RuntimeError("nope")

    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    assert wait_for(lambda: bus.state is me.BusState.FAILED)
    (entry,) = store.list().entries
    assert entry.status is MonitorStatus.FAILED and entry.error == "RuntimeError: nope"


def test_monitor_outage_never_touches_events(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    offered: list[int] = []  # the size of every batch the flusher tried to write

    class Down(MemoryMonitorStore):
        def write(self, entries: Any) -> None:
            offered.append(len(entries))
            raise me.StoreError("monitor store is down")

    monitor = MonitorMiddleware(Down(), max_buffered=3)
    seen = Recorder()
    bus = make_bus(client.shop.orders, monitor=monitor)
    bus.subscribe(lambda ev: seen.add(ev.document_id))
    bus.start()
    client.shop.orders.insert_many([{"_id": i} for i in range(10)])
    assert sorted(seen.wait(10)) == list(range(10))
    assert bus.join(5)
    # Bounded: only the newest 3 are kept, the others dropped (at least 7: a flush that falls
    # between a delivery's before and after hooks drops its "running" entry, and the completed
    # one enters the buffer again, to be dropped again), and the retries offer those 3
    assert wait_for(lambda: monitor.dropped >= 7 and offered[-1:] == [3], timeout=10), (
        monitor.dropped,
        offered,
    )
    assert bus.checkpoint is not None and bus.flush() is False  # the flush reports the failed task


def test_replay_is_recorded_at_once(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    store = MemoryMonitorStore()
    letters = me.MemoryDeadLetterStore()
    bus = make_bus(client.shop.orders, monitor=store, dead_letters=letters)
    fixed = threading.Event()

    @bus.subscribe(name="orders", max_retries=0)
    def handle(ev: me.ChangeEvent) -> None:
        if not fixed.is_set():
            raise RuntimeError("bug")

    bus.start()
    client.shop.orders.insert_one({"_id": 1})
    assert wait_for(lambda: letters.count() == 1)
    bus.stop()
    fixed.set()
    result = me.DeadLetters(letters, bus).replay()
    assert result.replayed == 1
    (entry,) = store.list().entries
    assert entry.status is MonitorStatus.COMPLETED and entry.metadata.get("replay") is True


# -- the middleware's own writes: the flusher's batches against a replay's direct write ----------


class HeldFirstWrite(MemoryMonitorStore):
    """Holds its first write (the flusher's batch) until ``release``; then lands it, or fails it.

    ``replay_moved`` is set once a completed entry has landed (the replay's own write).
    """

    def __init__(self, replay_moved: threading.Event, fail: bool = False) -> None:
        super().__init__()
        self.replay_moved = replay_moved
        self.fail = fail
        self.held = threading.Event()
        self.release = threading.Event()

    def write(self, entries: Any) -> None:
        if not self.held.is_set():
            self.held.set()
            if not self.release.wait(15):
                raise TimeoutError("the held write was never released")
            if self.fail:
                raise me.StoreError("monitor store is down")
        super().write(entries)
        if any(e.status is MonitorStatus.COMPLETED for e in entries):
            self.replay_moved.set()


class WaitSignallingLock:
    """A lock that sets ``replay_moved`` when a second thread has to wait for it.

    It stands in for the middleware's write lock: the held flush is released once the replay
    has either written its entry or is waiting for the flush's write to end (its write cannot
    come first then, so waiting for it would only time out).
    """

    def __init__(self, replay_moved: threading.Event) -> None:
        self._lock = threading.Lock()
        self.replay_moved = replay_moved

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        if not blocking:
            return False
        self.replay_moved.set()
        return self._lock.acquire(timeout=15)  # not the caller's: a loaded host may be slow

    def release(self) -> None:
        self._lock.release()


def _in_thread(target: Any, *args: Any) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target(*args)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def _replay_racing_a_flush(
    store: HeldFirstWrite, replay_moved: threading.Event
) -> tuple[MonitorMiddleware, list[BaseException]]:
    """Runs a replay whose pending entry the flusher took just before the replay completed.

    Returns the middleware and what its flush raised.
    """
    monitor = MonitorMiddleware(store)
    monitor._write_lock = WaitSignallingLock(replay_moved)  # type: ignore[assignment]
    delivery = me.Delivery(change_event(1), "orders", 1, None, None, bus="b", replay=True)
    # Given a replay under way, and the flusher's write of its pending entry held in the store
    monitor.before_delivery(delivery)
    flusher, flush_errors = _in_thread(monitor.flush)
    assert store.held.wait(15), "the flusher never wrote"
    # When the replay completes (its entry is written at once, or waits for the flush's write)
    replay, replay_errors = _in_thread(monitor.after_delivery, delivery, None, 0.0)
    assert replay_moved.wait(15), "the replay neither wrote its entry nor waited for the flush"
    store.release.set()
    flusher.join(15)
    replay.join(15)
    assert not flusher.is_alive() and not replay.is_alive() and not replay_errors
    return monitor, flush_errors


def test_a_flush_taken_before_a_replay_completed_never_lands_after_it() -> None:
    replay_moved = threading.Event()
    store = HeldFirstWrite(replay_moved)
    assert _replay_racing_a_flush(store, replay_moved)[1] == []
    # Then the entry shows the replay completed, not the flusher's older pending copy
    (entry,) = store.list().entries
    assert entry.status is MonitorStatus.COMPLETED and entry.completed_at is not None


def test_a_failed_flush_never_restores_an_entry_a_replay_has_written_since() -> None:
    replay_moved = threading.Event()
    store = HeldFirstWrite(replay_moved, fail=True)
    monitor, (error,) = _replay_racing_a_flush(store, replay_moved)
    assert isinstance(error, me.StoreError)
    # Then the flusher's next batch does not carry the failed batch's pending copy over it
    monitor.flush()
    (entry,) = store.list().entries
    assert entry.status is MonitorStatus.COMPLETED and entry.completed_at is not None


class HeldReplayWrite(MemoryMonitorStore):
    """Holds the first write (a replay's) until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.held, self.release = threading.Event(), threading.Event()

    def write(self, entries: Any) -> None:
        if not self.held.is_set():
            self.held.set()
            assert self.release.wait(15)
        super().write(entries)


@pytest.mark.parametrize("bounded", [True, False])
def test_a_flush_does_not_wait_for_a_replays_write(bounded: bool) -> None:
    # A replay writes on the caller's thread, perhaps to a slow store. A stop's final flush
    # (bounded) must not wait for it past its deadline, and the flusher's regular one (not
    # bounded) must not wait for it at all: it holds the flusher, and the checkpoint writes
    # behind it. The entries wait for the next flush.
    from mongo_events.flusher import Flusher

    store = HeldReplayWrite()
    monitor = MonitorMiddleware(store)
    replayed = me.Delivery(change_event(1), "orders", 1, None, None, bus="b", replay=True)
    delivered = me.Delivery(change_event(2), "orders", 1, None, None, bus="b")
    monitor.before_delivery(replayed)
    replay, replay_errors = _in_thread(monitor.after_delivery, replayed, None, 0.0)
    try:
        assert store.held.wait(15)
        monitor.before_delivery(delivered)
        monitor.after_delivery(delivered, None, 0.0)
        flusher = Flusher([monitor.flush], 60.0, "b")
        outcome: list[bool] = []
        ended = threading.Event()
        threading.Thread(
            target=lambda: (outcome.append(flusher.flush(timeout=0.2 if bounded else None)), ended.set()),
            daemon=True,
        ).start()
        # Then it ends while the replay's write still runs: a bounded flush says it did not
        # write, the regular one skips its turn quietly
        assert ended.wait(15), "the flush waited for the replay's write"
        assert outcome == [not bounded] and not store.release.is_set()
        assert {e.event_id for e in store.list().entries} == set()  # nothing written meanwhile
    finally:
        store.release.set()
    replay.join(15)
    assert not replay.is_alive() and not replay_errors
    # The entries it left are written by the next flush
    monitor.flush()
    statuses = {e.event_id: e.status for e in store.list().entries}
    assert statuses == {
        change_event(1).id: MonitorStatus.COMPLETED,
        change_event(2).id: MonitorStatus.COMPLETED,
    }


# -- the HTTP API ----------------------------------------------------------------------------------


@pytest.fixture
def api() -> tuple[Client, MemoryMonitorStore]:
    store = MemoryMonitorStore()
    now = now_ms()
    store.write(
        [
            MonitorEntry(
                "e1",
                "a",
                "shop.orders",
                "bus",
                MonitorStatus.COMPLETED,
                now - timedelta(minutes=3),
                "h:1",
                duration_ms=4.0,
            ),
            MonitorEntry(
                "e1",
                "b",
                "shop.orders",
                "bus",
                MonitorStatus.FAILED,
                now - timedelta(minutes=2),
                "h:1",
                error="boom",
                retry_count=5,
            ),
            MonitorEntry(
                "e2", "a", "shop.users", "bus", MonitorStatus.PENDING, now - timedelta(minutes=1), "h:2"
            ),
            MonitorEntry(
                "old", "a", "shop.orders", "bus", MonitorStatus.COMPLETED, now - timedelta(days=3), "h:1"
            ),
        ]
    )
    return Client(wsgi_app(store)), store


def test_list_filters_and_pages(api: tuple[Client, MemoryMonitorStore]) -> None:
    c, _ = api
    status, body = c.get("/v1/monitor/entries")
    assert status == 200 and [e["event_id"] for e in body["entries"]] == ["old", "e1", "e1", "e2"]
    assert body["has_more"] is False and body["next_cursor"] is None
    assert body["entries"][1]["started_at"].endswith("Z") and body["entries"][1]["status"] == "completed"
    status, body = c.get("/v1/monitor/entries?status=failed&status=pending&has_error=1")
    assert [e["event_id"] for e in body["entries"]] == ["e1"]
    status, body = c.get("/v1/monitor/entries?event_name=shop.users&order_desc=true")
    assert [e["event_id"] for e in body["entries"]] == ["e2"]
    status, body = c.get("/v1/monitor/entries?min_duration=2ms&min_retries=0")
    assert [e["subscription_id"] for e in body["entries"]] == ["a"]
    status, body = c.get("/v1/monitor/entries?limit=2")
    assert len(body["entries"]) == 2 and body["has_more"]
    status, rest = c.get(f"/v1/monitor/entries?limit=2&cursor={body['next_cursor']}")
    assert [(e["event_id"], e["subscription_id"]) for e in rest["entries"]] == [("e1", "b"), ("e2", "a")]


def test_get_count_summary(api: tuple[Client, MemoryMonitorStore]) -> None:
    c, _ = api
    assert c.get("/v1/monitor/entries/e1") == (
        200,
        {"entries": c.get("/v1/monitor/entries?event_id=e1")[1]["entries"]},
    )
    status, body = c.get("/v1/monitor/entries/e1/b")
    assert status == 200 and body["entry"]["error"] == "boom" and body["entry"]["retry_count"] == 5
    assert c.get("/v1/monitor/entries/e1/zzz") == (404, {"error": "entry not found"})
    assert c.get("/v1/monitor/entries/count") == (200, {"count": 4})
    assert c.get("/v1/monitor/entries/count?bus_id=bus&instance_id=h:2") == (200, {"count": 1})
    status, body = c.get("/v1/monitor/summary")
    assert status == 200 and body["total_entries"] == 3  # the last 24 hours
    assert body["by_status"] == {"completed": 1, "failed": 1, "pending": 1}
    assert body["by_event_name"]["shop.orders"]["error_rate"] == 0.5


def test_delete_needs_force_under_a_day(api: tuple[Client, MemoryMonitorStore]) -> None:
    c, store = api
    status, body = c.delete("/v1/monitor/entries?older_than=1h")
    assert status == 400 and "force=true" in body["error"]
    assert c.delete("/v1/monitor/entries?older_than=-5s")[0] == 400
    assert c.delete("/v1/monitor/entries?older_than=soon")[0] == 400
    # A write without the CSRF token (or with a wrong one) is refused.
    status, body, _ = c.request("DELETE", "/v1/monitor/entries", csrf=False)
    assert status == 403 and "CSRF" in body["error"]
    assert c.delete("/v1/monitor/entries") == (200, {"deleted": 1})  # default 24h
    assert c.delete("/v1/monitor/entries?older_than=90s&force=true") == (200, {"deleted": 2})
    assert store.count() == 1  # the entry one minute old stays


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("/v1/monitor/entries?start_time=yesterday", "RFC 3339"),
        ("/v1/monitor/entries?end_time=2026-13-01T00:00:00Z", "RFC 3339"),
        ("/v1/monitor/entries?has_error=maybe", "has_error"),
        ("/v1/monitor/entries?status=lost", "status must be one of"),
        ("/v1/monitor/entries?limit=ten", "limit must be an integer"),
        ("/v1/monitor/entries?limit=0", "limit must be from 1 to 1000"),
        ("/v1/monitor/entries?limit=1001", "limit must be from 1 to 1000"),
        ("/v1/monitor/entries?min_duration=inf", "min_duration"),
        ("/v1/monitor/entries?min_duration=1e400", "min_duration"),
        ("/v1/monitor/entries?min_duration=nan", "min_duration"),
        ("/v1/monitor/entries?min_duration=1000000d", "min_duration"),
        ("/v1/monitor/entries?start_time=9999-12-31T23:59:59-01:00", "RFC 3339"),
        ("/v1/monitor/entries?end_time=0001-01-01T00:00:00%2B01:00", "RFC 3339"),
        ("/v1/monitor/entries?min_retries=1234567890123456789012345", "min_retries"),
        ("/v1/monitor/entries?statuss=failed", "unknown query parameter(s) statuss"),
        ("/v1/monitor/entries/count?older_than=1h", "unknown query parameter"),
        ("/v1/monitor/entries/e1?limit=5", "unknown query parameter"),
        ("/v1/monitor/entries?min_duration=fast", "min_duration"),
        ("/v1/monitor/entries?cursor=%%%", "cursor"),
        ("/v1/monitor/entries/count?min_retries=-1", "min_retries"),
        ("/v1/monitor/summary?start_time=bad", "RFC 3339"),
    ],
)
def test_bad_parameters_are_400_with_a_reason(
    api: tuple[Client, MemoryMonitorStore], url: str, needle: str
) -> None:
    status, body = api[0].get(url)
    assert status == 400 and needle in body["error"]


def test_wrong_method_and_unknown_route(api: tuple[Client, MemoryMonitorStore]) -> None:
    c, _ = api
    status, body, headers = c.request("POST", "/v1/monitor/entries")
    assert (status, body) == (405, {"error": "method not allowed"}) and headers["Allow"] == "GET, DELETE"
    assert c.delete("/v1/monitor/summary")[0] == 405
    assert c.delete("/v1/monitor/entries/e1")[0] == 405
    assert c.get("/v1/nothing")[0] == 404
    assert c.get("/v1/health") == (404, {"error": "no health source configured"})


@pytest.mark.parametrize("older_than", ["inf", "1e400", "1000000d", "-1h"])
def test_bad_delete_ages_are_400(api: tuple[Client, MemoryMonitorStore], older_than: str) -> None:
    status, body = api[0].delete(f"/v1/monitor/entries?older_than={older_than}&force=true")
    assert status == 400 and "older_than" in body["error"]
    assert api[0].delete("/v1/monitor/entries?older_than=48h&verbose=1")[0] == 400


def test_a_huge_min_retries_is_a_400_before_it_reaches_mongodb(client: pymongo.MongoClient[Any]) -> None:
    # BSON has no integer this large: the store would raise OverflowError (a 500 in text/plain).
    c = Client(wsgi_app(MongoMonitorStore(client.internal)))
    status, body = c.get("/v1/monitor/entries?min_retries=1234567890123456789012345")
    assert status == 400 and "min_retries" in body["error"]
    assert c.get("/v1/monitor/entries?min_retries=2147483647")[0] == 200


def test_a_bug_is_a_json_500() -> None:
    class Buggy(MemoryMonitorStore):
        def count(self, filter: Any = None) -> int:
            raise KeyError("oops")

    status, body = Client(wsgi_app(Buggy())).get("/v1/monitor/entries/count")
    assert status == 500 and body == {"error": "internal error: KeyError"}


def test_store_failure_is_a_500() -> None:
    class Broken(MemoryMonitorStore):
        def count(self, filter: Any = None) -> int:
            raise me.StoreError("database unreachable")

    status, body = Client(wsgi_app(Broken())).get("/v1/monitor/entries/count")
    assert status == 500 and "database unreachable" in body["error"]


def test_health_route_serves_bus_health(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    bus = make_bus(client.shop.orders)
    bus.subscribe(lambda ev: None)
    c = Client(wsgi_app(MemoryMonitorStore(), health=bus.health))
    status, body = c.get("/v1/health")
    assert status == 503 and body["status"] == "unhealthy" and body["state"] == "new"
    bus.start()
    assert wait_for(lambda: c.get("/v1/health")[0] == 200)
    assert c.get("/v1/health")[1]["stream_active"] is True
    assert c.request("POST", "/v1/health")[0] == 405


def test_parse_duration() -> None:
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("250ms") == timedelta(milliseconds=250)
    assert parse_duration("7d") == timedelta(days=7)
    assert parse_duration("45") == timedelta(seconds=45)
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("1h foo")
    for text in ("inf", "-inf", "nan", "1e400", "-5s", "1000000d"):
        with pytest.raises(ValueError):
            parse_duration(text)
    assert parse_duration("36500d") == timedelta(days=36500)


def test_stores_are_interchangeable() -> None:
    assert issubclass(MemoryMonitorStore, MonitorStore) and issubclass(MongoMonitorStore, MonitorStore)


def test_times_are_parsed_as_they_are_served() -> None:
    served = now_ms()
    assert parse_rfc3339(rfc3339(served)) == served
    assert parse_rfc3339("2026-01-31T12:00:00") == parse_rfc3339("2026-01-31T12:00:00Z")  # no offset: UTC
    assert parse_rfc3339("2026-01-31T13:00:00+01:00") == parse_rfc3339("2026-01-31T12:00:00Z")
    with pytest.raises(ValueError):
        parse_rfc3339("yesterday")


def test_a_planted_csrf_cookie_is_refused() -> None:
    store = MemoryMonitorStore()
    app = wsgi_app(store)

    def delete(token: str) -> int:
        environ: dict[str, Any] = {
            "REQUEST_METHOD": "DELETE",
            "PATH_INFO": "/v1/monitor/entries",
            "HTTP_COOKIE": f"mongo_events_csrf={token}",
            "HTTP_X_CSRF_TOKEN": token,
        }
        setup_testing_defaults(environ)
        captured: list[str] = []
        b"".join(app(environ, lambda status, headers: captured.append(status)))  # type: ignore[arg-type,func-returns-value]
        return int(captured[0].split()[0])

    # A cookie set from a sibling subdomain, sent back with the same value as the token:
    assert delete("planted-by-evil.example") == 403
    assert delete("nonce.c2lnbmVkIGJ5IHNvbWVvbmUgZWxzZQ") == 403  # signed with another secret
    other = Client(wsgi_app(store))  # another app object: another random secret
    assert delete(other.get("/v1/csrf")[1]["token"]) == 403
    assert delete(Client(app).get("/v1/csrf")[1]["token"]) == 200  # this app's own token
    # Worker processes sharing csrf_secret accept each other's tokens.
    first, second = wsgi_app(store, csrf_secret="s3cret"), wsgi_app(store, csrf_secret="s3cret")
    app = second
    assert delete(Client(first).get("/v1/csrf")[1]["token"]) == 200
