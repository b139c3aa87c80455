"""The dashboard and its JSON endpoints through a WSGI test client (the browser tests are in
tests/test_dashboard_browser.py)."""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pymongo
import pytest
from werkzeug.test import Client

import mongo_events as me
from mongo_events.monitor import (
    MemoryConsumerStatusStore,
    MemoryMonitorStore,
    MonitorEntry,
    MonitorStatus,
    wsgi_app,
)
from mongo_events.stores.records import AckRecord, DeadLetter

from .conftest import wait_for
from .helpers import QUICK, Recorder, make_member, make_status

EVIL = "<script>window.__pwned = 1</script>"


def _letter(letter_id: str, error: str = "ValueError: bad", **values: Any) -> DeadLetter:
    payload = {"_id": {"_data": "82" + "0" * 16}, "operationType": "insert", "fullDocument": {"note": EVIL}}
    return DeadLetter(
        id=letter_id,
        event_name="orders",
        original_id="82" + letter_id,
        payload=payload,
        metadata={"bus": "orders"},
        error=error,
        retry_count=2,
        source="orders",
        created_at=datetime.now(timezone.utc),
        **values,
    )


def _csrf(client: Client, path: str = "/") -> str:
    response = client.get(path)
    cookie = client.get_cookie("mongo_events_csrf")
    assert response.status_code in (200, 404) and cookie is not None
    return cookie.value


def test_pages_escape_every_stored_value() -> None:
    status = MemoryConsumerStatusStore()
    status.publish(make_status(bus=EVIL, last_error=EVIL, history=((0, 1, 1),)))
    letters = me.MemoryDeadLetterStore()
    letters.store(_letter("d1", error=EVIL))
    monitor = MemoryMonitorStore()
    monitor.write(
        [
            MonitorEntry(
                "ev1",
                EVIL,
                "shop.orders",
                "orders",
                MonitorStatus.FAILED,
                datetime.now(timezone.utc),
                error=EVIL,
            )
        ]
    )
    c = Client(wsgi_app(monitor, status=status, dead_letters=letters))
    for path in ("/", "/events", "/events/ev1", "/dead-letters", "/dead-letters/d1"):
        response = c.get(path)
        text = response.get_data(as_text=True)
        assert response.status_code == 200 and response.mimetype == "text/html", path
        assert "<script" not in text.lower(), path
        assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in text, path
        assert (
            "script-src" not in response.headers["Content-Security-Policy"]
        )  # default-src 'none' covers scripts
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def test_overview_shows_consumers_and_warns_on_low_oplog_headroom() -> None:
    status = MemoryConsumerStatusStore()
    now = datetime.now(timezone.utc)
    minute = int(now.timestamp() // 60 * 60)
    status.publish(make_status(id="a", oplog_headroom=1800.0, history=((minute, 7, 2),), lag=0.25, pending=3))
    status.publish(make_status(id="b", host="other", oplog_headroom=86400.0 * 3))
    text = Client(wsgi_app(MemoryMonitorStore(), status=status)).get("/").get_data(as_text=True)
    rows = re.findall(r'<tr class="consumer".*?</tr>', text)
    assert len(rows) == 2
    assert '<td class="num warn">30m</td>' in rows[0] and "warn" not in rows[1]
    assert "<svg" in text and text.count('class="ok"') == 1 and text.count('class="bad"') == 1
    assert "7 processed, 2 failed" in text
    assert 'id="groups"' not in text  # no consumer reports a group: the table stays hidden
    assert '<meta http-equiv="refresh"' in text


def test_health_and_consumers_come_from_published_statuses() -> None:
    status = MemoryConsumerStatusStore(ttl=60)
    c = Client(wsgi_app(MemoryMonitorStore(), status=status))
    response = c.get("/v1/health?bus=orders")
    assert response.status_code == 503 and "no consumer of bus 'orders'" in response.json["error"]
    status.publish(make_status(id="a"))
    status.publish(make_status(id="b", status="degraded"))
    response = c.get("/v1/health?bus=orders")
    assert response.status_code == 200 and response.json["status"] == "degraded"
    # A consumer that stopped cleanly does not make the bus unhealthy while another runs...
    status.publish(make_status(id="b", status="unhealthy", state="stopped"))
    assert c.get("/v1/health?bus=orders").json["status"] == "healthy"
    # ...but a silent one (no heartbeat for three intervals) whose checkpoint no live one serves does.
    status.publish(
        make_status(
            id="c",
            checkpoint_key="shop.orders::c",
            heartbeat_at=datetime.now(timezone.utc) - timedelta(seconds=20),
        )
    )
    response = c.get("/v1/health")
    assert response.status_code == 503 and response.json["status"] == "unhealthy"
    assert "consumer h:1 of bus 'orders' is stale" in response.json["error"]
    assert "checkpoint key 'shop.orders::c'" in response.json["error"]
    consumers = c.get("/v1/consumers").json
    assert [s["id"] for s in consumers["consumers"]] == ["a", "b", "c"] and consumers["groups"] == []
    assert consumers["consumers"][2]["stale"] is True and consumers["consumers"][0]["group"] is None
    assert c.get("/v1/consumers?bus=nope").json["consumers"] == []
    assert c.get("/v1/consumers?bsu=orders").status_code == 400


def _killed_member_fleet() -> MemoryConsumerStatusStore:
    """The new-user probe's fleet: two members of group ``billing`` on bus ``orders``;
    vm:3345 was SIGKILLed 40 s ago (its last status names partitions 1 and 3 until the TTL
    removes it) and vm:3342 took every partition over."""
    now = datetime.now(timezone.utc)
    status = MemoryConsumerStatusStore(ttl=120)
    status.publish(make_member(3342, (0, 1, 2, 3), now))
    status.publish(make_member(3345, (1, 3), now - timedelta(seconds=40)))
    return status


def test_a_killed_group_member_does_not_make_the_bus_unhealthy_once_another_took_over() -> None:
    c = Client(wsgi_app(MemoryMonitorStore(), status=_killed_member_fleet()))
    for path in ("/v1/health?bus=orders", "/v1/health"):
        response = c.get(path)
        assert response.status_code == 200, (path, response.json)
        assert response.json["status"] == "healthy" and "error" not in response.json
        # The dead member is still listed, marked stale.
        assert [(s["pid"], s["stale"]) for s in response.json["consumers"]] == [(3342, False), (3345, True)]


def test_consumers_lists_the_groups_with_the_partitions_live_members_hold() -> None:
    c = Client(wsgi_app(MemoryMonitorStore(), status=_killed_member_fleet()))
    body = c.get("/v1/consumers").json
    assert [s["pid"] for s in body["consumers"]] == [3342, 3345]
    (group,) = body["groups"]
    assert group["group"] == "billing" and group["namespace"] == "shop.orders"
    assert group["partition_count"] == 4 and group["unheld"] == [] and group["contested"] == []
    assert [(m["pid"], m["partitions"]) for m in group["members"]] == [(3342, [0, 1, 2, 3])]
    assert [(m["pid"], m["stale"]) for m in group["inactive"]] == [(3345, True)]
    assert c.get("/v1/consumers?bus=other").json == {"consumers": [], "groups": []}


def test_consumers_names_the_partitions_no_live_member_holds() -> None:
    now = datetime.now(timezone.utc)
    status = MemoryConsumerStatusStore()
    # The survivor has not taken the dead member's share yet.
    status.publish(make_member(3342, (0, 2), now))
    status.publish(make_member(3345, (1, 3), now - timedelta(seconds=40)))
    c = Client(wsgi_app(MemoryMonitorStore(), status=status))
    (group,) = c.get("/v1/consumers").json["groups"]
    assert group["unheld"] == [1, 3] and [m["pid"] for m in group["members"]] == [3342]
    text = c.get("/").get_data(as_text=True)
    (row,) = re.findall(r'<tr class="group">.*?</tr>', text)
    assert '<td class="unheld unhealthy">1, 3</td>' in row


def test_the_groups_table_shows_partitions_of_live_members_only() -> None:
    text = (
        Client(wsgi_app(MemoryMonitorStore(), status=_killed_member_fleet())).get("/").get_data(as_text=True)
    )
    assert "vm:3342 [0, 1, 2, 3]" in text and "vm:3345 [1, 3]" not in text
    (row,) = re.findall(r'<tr class="group">.*?</tr>', text)
    (owners,) = re.findall(r'<td class="owners">(.*?)</td>', row)
    assert owners == "vm:3342 [0, 1, 2, 3]"  # not also "vm:3345 [1, 3]"
    (inactive,) = re.findall(r'<span class="inactive">(.*?)</span>', row)
    assert inactive.startswith("vm:3345 (stale, heartbeat 40") and "[" not in inactive
    assert '<td class="unheld"></td>' in row
    assert re.search(r"<b>1</b>consumers", text) and re.search(r'<b class="unhealthy">1</b>stale', text)


def test_the_consumers_tile_counts_live_consumers_only() -> None:
    now = datetime.now(timezone.utc)
    status = MemoryConsumerStatusStore()
    status.publish(make_status(id="a", pid=1, heartbeat_at=now))
    status.publish(make_status(id="b", pid=2, heartbeat_at=now, state="stopped", status="unhealthy"))
    status.publish(make_status(id="c", pid=3, heartbeat_at=now, state="failed", status="unhealthy"))
    status.publish(make_status(id="d", pid=4, heartbeat_at=now - timedelta(seconds=40)))
    text = Client(wsgi_app(MemoryMonitorStore(), status=status)).get("/").get_data(as_text=True)
    tiles = re.findall(r'<div class="tile"><b[^>]*>(\d+)</b>([^<]*)</div>', text)
    assert tiles[:3] == [("1", "consumers"), ("1", "stale (no heartbeat)"), ("2", "stopped or failed")]
    assert len(re.findall(r'<tr class="consumer"', text)) == 4  # each still has its row


def test_health_is_unhealthy_when_no_consumer_is_live() -> None:
    now = datetime.now(timezone.utc)
    status = MemoryConsumerStatusStore(ttl=120)
    status.publish(make_member(3342, (0, 1), now - timedelta(seconds=30)))
    status.publish(make_member(3345, (2, 3), now - timedelta(seconds=50)))
    status.publish(make_status(id="p", bus="payments", checkpoint_key="shop.payments::h"))
    c = Client(wsgi_app(MemoryMonitorStore(), status=status))
    for path in ("/v1/health?bus=orders", "/v1/health"):  # the fleet is as bad as its worst bus
        response = c.get(path)
        assert response.status_code == 503 and response.json["status"] == "unhealthy", path
        assert response.json["error"].startswith(
            "no live consumer of bus 'orders': the 2 that published are stale"
        )
        assert "newest heartbeat is 30s old (from vm:3342)" in response.json["error"]
    assert c.get("/v1/health?bus=payments").json["status"] == "healthy"
    # Every consumer stopped cleanly: nothing consumes, so still unhealthy, and said so.
    status = MemoryConsumerStatusStore()
    status.publish(make_status(state="stopped", status="unhealthy"))
    response = Client(wsgi_app(MemoryMonitorStore(), status=status)).get("/v1/health?bus=orders")
    assert response.status_code == 503 and "no live consumer of bus 'orders'" in response.json["error"]
    assert "published are stopped" in response.json["error"]


def test_a_restarted_consumer_replaces_its_dead_predecessor_in_health() -> None:
    now = datetime.now(timezone.utc)
    status = MemoryConsumerStatusStore()
    # The same checkpoint key: a process killed 40 s ago and its restart under a new pid.
    status.publish(make_status(id="h:1:orders", pid=1, heartbeat_at=now - timedelta(seconds=40)))
    status.publish(make_status(id="h:2:orders", pid=2, heartbeat_at=now))
    c = Client(wsgi_app(MemoryMonitorStore(), status=status))
    assert c.get("/v1/health?bus=orders").json["status"] == "healthy"
    # A failed one whose key nobody else serves is an outage even with its status fresh.
    status.publish(make_status(id="h:3:orders", pid=3, checkpoint_key="k3", state="failed", heartbeat_at=now))
    response = c.get("/v1/health?bus=orders")
    assert response.status_code == 503
    assert "consumer h:3 of bus 'orders' is failed" in response.json["error"]
    # A failed group member whose partitions a live member took is not.
    status = MemoryConsumerStatusStore()
    status.publish(make_member(1, (0, 1, 2, 3), now))
    status.publish(make_member(2, (2, 3), now, state="failed", status="unhealthy"))
    assert Client(wsgi_app(MemoryMonitorStore(), status=status)).get("/v1/health").status_code == 200


def test_a_group_whose_live_member_holds_no_partition_is_not_healthy() -> None:
    now = datetime.now(timezone.utc)
    # Given member 3342 SIGKILLed 100 s ago holding every partition, and the survivor unable
    # to take them (its lease writes time out): it is live and healthy, and holds nothing.
    status = MemoryConsumerStatusStore(ttl=120)
    status.publish(make_member(3342, (), now))
    status.publish(make_member(3345, (0, 1, 2, 3), now - timedelta(seconds=100)))
    c = Client(wsgi_app(MemoryMonitorStore(), status=status))
    for path in ("/v1/health?bus=orders", "/v1/health"):
        response = c.get(path)
        # Then nothing is consumed and it says so; degraded (200): a handover looks the same
        # for a few seconds and must not fail probes.
        assert response.status_code == 200 and response.json["status"] == "degraded", path
        assert (
            "group 'billing' on shop.orders of bus 'orders': partitions 0, 1, 2, 3 of 4 are held by no "
            "live member (live: vm:3342 running holding [])" in response.json["error"]
        )
    # Half taken over: the other half is named.
    status.publish(make_member(3342, (0, 1), now))
    assert "partitions 2, 3 of 4 are held by no live member" in c.get("/v1/health").json["error"]
    # Without K (statuses from an older publisher) a live member still covers the group.
    status = MemoryConsumerStatusStore(ttl=120)
    status.publish(make_member(3342, (), now, partition_count=None))
    status.publish(make_member(3345, (0, 1, 2, 3), now - timedelta(seconds=100), partition_count=None))
    response = Client(wsgi_app(MemoryMonitorStore(), status=status)).get("/v1/health")
    assert response.status_code == 200 and response.json["status"] == "healthy"


def test_a_rolling_restart_keeps_the_bus_healthy() -> None:
    now = datetime.now(timezone.utc)
    # Given two running consumers and a new one whose first status is written while it starts
    # (Health says unhealthy for any state but running), on the same checkpoint key.
    status = MemoryConsumerStatusStore()
    status.publish(make_status(id="h:1:orders", pid=1, heartbeat_at=now))
    status.publish(make_status(id="h:2:orders", pid=2, heartbeat_at=now))
    status.publish(
        make_status(id="h:3:orders", pid=3, heartbeat_at=now, state="starting", status="unhealthy")
    )
    c = Client(wsgi_app(MemoryMonitorStore(), status=status))
    response = c.get("/v1/health?bus=orders")
    assert response.status_code == 200 and response.json["status"] == "healthy", response.json
    assert "error" not in response.json
    # An old one stopping is not an outage either.
    status.publish(
        make_status(id="h:1:orders", pid=1, heartbeat_at=now, state="stopping", status="unhealthy")
    )
    assert c.get("/v1/health?bus=orders").status_code == 200
    # The same in a group: the new member holds nothing yet, the running ones hold everything.
    status = MemoryConsumerStatusStore()
    status.publish(make_member(1, (0, 1), now))
    status.publish(make_member(2, (2, 3), now))
    status.publish(make_member(3, (), now, state="starting", status="unhealthy"))
    response = Client(wsgi_app(MemoryMonitorStore(), status=status)).get("/v1/health")
    assert response.status_code == 200 and response.json["status"] == "healthy", response.json


def test_every_unhealthy_answer_says_why() -> None:
    now = datetime.now(timezone.utc)
    status = MemoryConsumerStatusStore()
    c = Client(wsgi_app(MemoryMonitorStore(), status=status))
    # A consumer starting with no running one doing its work: nothing consumes yet.
    status.publish(make_status(id="h:1:orders", heartbeat_at=now, state="starting", status="unhealthy"))
    response = c.get("/v1/health?bus=orders")
    assert response.status_code == 503 and response.json["error"] == (
        "consumer h:1 of bus 'orders' is starting and reports unhealthy, and no running consumer serves "
        "its checkpoint key 'shop.orders::h'"
    )
    # A running consumer that reports unhealthy itself (a stalled checkpoint, say).
    status.publish(
        make_status(id="h:1:orders", heartbeat_at=now, status="unhealthy", last_error="StoreError: stalled")
    )
    response = c.get("/v1/health")
    assert response.status_code == 503
    assert response.json["error"] == "consumer h:1 of bus 'orders' reports unhealthy (StoreError: stalled)"


def test_dead_letter_and_ack_endpoints() -> None:
    letters = me.MemoryDeadLetterStore()
    letters.store(_letter("d1", error="ValueError: bad amount"))
    letters.store(_letter("d2", error="KeyError: sku"))
    acks = me.MemoryAckStore()
    now = datetime.now(timezone.utc)
    acks.write([AckRecord("e1", now), AckRecord("e2", now, now)])
    c = Client(wsgi_app(MemoryMonitorStore(), dead_letters=letters, acks=acks))
    body = c.get("/v1/dead-letters?error=amount").json
    assert [d["id"] for d in body["dead_letters"]] == ["d1"] and body["dead_letters"][0][
        "created_at"
    ].endswith("Z")
    assert c.get("/v1/dead-letters/count").json == {"count": 2}
    assert c.get("/v1/dead-letters/stats").json["pending"] == 2
    assert c.get("/v1/dead-letters/d2").json["dead_letter"]["error"] == "KeyError: sku"
    assert c.get("/v1/dead-letters/nope").status_code == 404
    assert c.get("/v1/dead-letters?limit=0").status_code == 400
    # No replay function: replay is refused with where to run it.
    token = _csrf(c, "/v1/csrf")
    response = c.post("/v1/dead-letters/d1/replay", headers={"X-CSRF-Token": token})
    assert response.status_code == 501 and "mongo-events dlq replay" in response.json["error"]
    # Delete needs the token.
    assert c.delete("/v1/dead-letters/d2").status_code == 403
    assert c.delete("/v1/dead-letters/d2", headers={"X-CSRF-Token": token}).json == {"deleted": "d2"}
    assert c.delete("/v1/dead-letters/d2", headers={"X-CSRF-Token": token}).status_code == 404
    assert [a["event_id"] for a in c.get("/v1/acks?status=pending").json["acks"]] == ["e1"]
    assert c.get("/v1/acks/count").json == {"count": 2, "pending": 1}
    assert c.get("/v1/acks/e2").json["ack"]["status"] == "acked"
    assert c.get("/v1/acks?status=done").status_code == 400


def test_replay_over_http_runs_the_callback(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    letters = me.MemoryDeadLetterStore()
    bus = make_bus(client.shop.orders, name="orders", dead_letters=letters)
    broken = {"on": True}
    seen = Recorder()

    @bus.subscribe(name="orders", max_retries=0, retry_backoff=QUICK)
    def handle(ev: me.ChangeEvent) -> None:
        if broken["on"]:
            raise ValueError("not yet")
        seen.add(ev.document_id)

    bus.start()
    client.shop.orders.insert_many([{"_id": 1}, {"_id": 2}])
    assert wait_for(lambda: letters.count() == 2)
    broken["on"] = False
    c = Client(wsgi_app(MemoryMonitorStore(), replay=bus))
    one, two = letters.list()
    # The page offers Replay; its confirmation page holds a form with the CSRF token.
    page = c.get("/dead-letters").get_data(as_text=True)
    assert f"/dead-letters/{one.id}/replay" in page
    confirm = c.get(f"/dead-letters/{one.id}/replay").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', confirm)
    assert token and token.group(1) == c.get_cookie("mongo_events_csrf").value  # type: ignore[union-attr]
    # A POST without it (a cross-site form) is refused, and nothing ran.
    assert c.post(f"/dead-letters/{one.id}/replay", data={}).status_code == 403
    assert c.post(f"/dead-letters/{one.id}/replay", data={"csrf_token": "forged"}).status_code == 403
    assert seen.items == []
    response = c.post(f"/dead-letters/{one.id}/replay", data={"csrf_token": token.group(1)})
    assert response.status_code == 303 and response.headers["Location"].endswith(
        "/dead-letters?done=replayed"
    )
    assert seen.wait(1) == [one.payload["documentKey"]["_id"]]
    assert letters.get(one.id).retried_at is not None  # type: ignore[union-attr]
    # JSON: replay one
    body = c.post(f"/v1/dead-letters/{two.id}/replay", headers={"X-CSRF-Token": token.group(1)}).json
    assert body == {"id": two.id, "outcome": "replayed"} and len(seen.wait(2)) == 2
    # the list now shows none waiting
    assert 'id="empty"' in c.get("/dead-letters").get_data(as_text=True)


def test_bulk_replay_of_a_filter(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    letters = me.MemoryDeadLetterStore()
    bus = make_bus(client.shop.orders, name="orders", dead_letters=letters)
    seen = Recorder()
    bus.subscribe(lambda ev: seen.add(ev.document_id), name="orders")
    for i, error in enumerate(["ValueError: a", "ValueError: b", "KeyError: c"]):
        letter = _letter(f"d{i}", error=error)
        payload = {
            **letter.payload,
            "_id": {"_data": f"82{i:016d}"},
            "documentKey": {"_id": i},
            "ns": {"db": "shop", "coll": "orders"},
        }
        letters.store(_with_payload(letter, payload))
    c = Client(wsgi_app(MemoryMonitorStore(), replay=bus))
    confirm = c.get("/dead-letters/replay?error=valueerror").get_data(as_text=True)
    assert "Replay the 2 dead letters" in confirm
    token = re.search(r'name="csrf_token" value="([^"]+)"', confirm)
    assert token
    response = c.post("/dead-letters/replay", data={"csrf_token": token.group(1), "error": "valueerror"})
    assert response.status_code == 303 and "replayed=2" in response.headers["Location"]
    assert sorted(seen.wait(2)) == [0, 1]
    assert "2 replayed" in c.get(response.headers["Location"]).get_data(as_text=True)


def _with_payload(letter: DeadLetter, payload: dict[str, Any]) -> DeadLetter:
    import attrs

    return attrs.evolve(letter, payload=payload)


def test_read_only_hides_and_refuses_writes() -> None:
    letters = me.MemoryDeadLetterStore()
    letters.store(_letter("d1"))
    c = Client(wsgi_app(MemoryMonitorStore(), dead_letters=letters, read_only=True))
    page = c.get("/dead-letters").get_data(as_text=True)
    assert "/dead-letters/d1/delete" not in page and "Delete" not in page
    assert c.get("/dead-letters/d1/delete").status_code == 403
    token = _csrf(c)
    assert c.post("/dead-letters/d1/delete", data={"csrf_token": token}).status_code == 403
    assert c.delete("/v1/dead-letters/d1", headers={"X-CSRF-Token": token}).status_code == 403
    assert letters.count() == 1


def test_basic_auth_and_auth_callable() -> None:
    c = Client(wsgi_app(MemoryMonitorStore(), basic_auth=("ops", "s3cret")))
    response = c.get("/")
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
    wrong = base64.b64encode(b"ops:nope").decode()
    assert c.get("/v1/monitor/entries", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    assert c.get("/", headers={"Authorization": "Basic !!!"}).status_code == 401
    good = base64.b64encode(b"ops:s3cret").decode()
    assert c.get("/", headers={"Authorization": f"Basic {good}"}).status_code == 200
    gated = Client(wsgi_app(MemoryMonitorStore(), auth=lambda environ: environ.get("HTTP_X_USER") == "ann"))
    assert gated.get("/v1/monitor/entries").status_code == 403
    assert gated.get("/v1/monitor/entries", headers={"X-User": "ann"}).status_code == 200
    with pytest.raises(me.ConfigurationError):
        wsgi_app(MemoryMonitorStore(), basic_auth=("ops", ""))


def test_links_follow_the_mount_point() -> None:
    letters = me.MemoryDeadLetterStore()
    letters.store(_letter("d1"))
    c = Client(wsgi_app(MemoryMonitorStore(), dead_letters=letters))
    text = c.get("/dead-letters", environ_overrides={"SCRIPT_NAME": "/ops/events"}).get_data(as_text=True)
    assert 'href="/ops/events/dead-letters/d1"' in text and 'href="/ops/events/events"' in text
    cookie = c.get_cookie("mongo_events_csrf", path="/ops/events")
    assert cookie is not None and cookie.http_only and cookie.same_site == "Strict"


def test_events_page_filters_and_pages() -> None:
    store = MemoryMonitorStore()
    now = datetime.now(timezone.utc)
    store.write(
        [
            MonitorEntry(
                f"e{i}",
                "orders" if i % 2 else "users",
                "shop.x",
                "bus",
                MonitorStatus.COMPLETED if i % 3 else MonitorStatus.FAILED,
                now - timedelta(seconds=i),
            )
            for i in range(120)
        ]
    )
    c = Client(wsgi_app(store))
    text = c.get("/events?status=failed&subscription_id=orders").get_data(as_text=True)
    rows = re.findall(r'<tr class="entry">', text)
    assert len(rows) == 20  # i odd and divisible by 3: 3, 9, ..., 117
    first = c.get("/events").get_data(as_text=True)
    assert len(re.findall(r'<tr class="entry">', first)) == 50
    cursor = re.search(r'id="next" href="([^"]+)"', first)
    assert cursor
    second = c.get(cursor.group(1).replace("&amp;", "&")).get_data(as_text=True)
    assert len(re.findall(r'<tr class="entry">', second)) == 50 and second != first
    assert c.get("/events?status=nope").status_code == 400
    assert c.get("/nowhere").status_code == 404


def test_mounted_in_django_with_its_csrf_middleware_on() -> None:
    # Django's settings can be configured once per process: the project runs in its own.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, str(root / "tests" / "django_dashboard_app.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and "django ok" in result.stdout, result.stderr


def test_mounted_in_flask_under_a_prefix() -> None:
    from flask import Flask
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    letters = me.MemoryDeadLetterStore()
    letters.store(_letter("d1"))
    app = Flask(__name__)
    app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, {"/ops/events": wsgi_app(MemoryMonitorStore(), dead_letters=letters)}
    )
    c = app.test_client()
    page = c.get("/ops/events/dead-letters").get_data(as_text=True)
    assert 'href="/ops/events/dead-letters/d1/delete"' in page
    confirm = c.get("/ops/events/dead-letters/d1/delete").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', confirm)
    assert token
    done = c.post("/ops/events/dead-letters/d1/delete", data={"csrf_token": token.group(1)})
    assert done.status_code == 303 and letters.count() == 0


def test_served_by_gunicorn_with_two_workers(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    (tmp_path / "dashboard.py").write_text(
        "from mongo_events.monitor import MemoryMonitorStore, wsgi_app\n"
        "app = wsgi_app(MemoryMonitorStore(), read_only=True)\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", "127.0.0.1:0", "dashboard:app"],
        env=env,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        port = None
        for line in proc.stderr:  # ends when gunicorn exits: bounded by the test timeout
            found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = found.group(1)
                break
        assert port, "gunicorn did not start"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/monitor/entries/count", timeout=10) as resp:
            assert resp.read() == b'{"count": 0}'
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert resp.status == 200 and b"Overview" in resp.read()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
