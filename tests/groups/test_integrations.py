"""The Flask and Django integrations' group setting: every configured bus joins the group."""

from __future__ import annotations

import types

import flask

from mongo_events.contrib import BusRegistry
from mongo_events.contrib.django import configure, registry
from mongo_events.contrib.flask import MongoEvents
from mongo_events.testing import FakeReplicaSet

BUSES = {
    "orders": {"database": "shop", "collection": "orders"},
    "own": {"database": "shop", "collection": "orders", "group": "own"},
    "plain": {"database": "shop", "collection": "users"},
}


def test_the_flask_group_setting_puts_every_bus_without_its_own_in_the_group(fake_rs: FakeReplicaSet) -> None:
    app = flask.Flask("group_test")
    app.config.update(MONGO_EVENTS_URI=fake_rs.uri, MONGO_EVENTS_BUSES=BUSES, MONGO_EVENTS_GROUP="web")
    events = MongoEvents(app)
    assert events.bus("orders").group == "web"
    assert events.bus("own").group == "own"  # a bus's own spec wins


def test_without_the_setting_buses_have_no_group(fake_rs: FakeReplicaSet) -> None:
    reg = BusRegistry(BUSES, uri=fake_rs.uri)
    assert reg.bus("plain").group is None
    assert reg.bus("own").group == "own"


def test_the_django_group_setting_reaches_the_registry(fake_rs: FakeReplicaSet) -> None:
    before = (registry.group, dict(registry.config), registry.uri)
    try:
        configure(types.SimpleNamespace(MONGO_EVENTS={"URI": fake_rs.uri, "BUSES": {}, "GROUP": "web"}))
        assert registry.group == "web"
    finally:
        registry.group, registry.uri = before[0], before[2]
        registry.config.clear()
        registry.config.update(before[1])
