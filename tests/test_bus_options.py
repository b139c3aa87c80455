"""Bus options live in one place (issue 17): ``BusOptions`` in mongo_events/bus_options.py.

A new option is a keyword of ``Bus.__init__`` (documented in Bus's docstring) and a field
of ``BusOptions``; these tests fail when one of the three is forgotten. The messages of
bad options are covered by test_bad_input.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import attrs
import pymongo
import pytest

import mongo_events as me
from mongo_events.bus_options import BusOptionAttributes, BusOptions, OptionAttribute

#: The option attributes a Bus had when its __init__ set them one by one.
BUS_ATTRIBUTES_BEFORE_ISSUE_17 = set(
    [
        "name",
        "level",
        "full_document",
        "full_document_before_change",
        "full_document_only",
        "update_description",
        "include_empty_updates",
        "max_updated_fields_size",
        "pipeline",
        "batch_size",
        "max_await_time",
        "show_expanded_events",
        "resume",
        "token_store",
        "start_from_past",
        "max_workers",
        "max_in_flight",
        "ordering",
        "flush_interval",
        "ack_store",
        "on_history_lost",
        "history_lost_callback",
        "start_timeout",
        "metrics",
        "monitor",
        "on_error",
        "status",
        "idempotency",
        "snapshot_mode",
        "snapshot_collections",
        "snapshot_filter",
        "snapshot_batch_size",
    ]
)


@pytest.fixture
def offline() -> Iterator[pymongo.MongoClient[Any]]:
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(
        "mongodb://127.0.0.1:1", connect=False, serverSelectionTimeoutMS=100
    )
    yield client
    client.close()


def _keywords() -> list[str]:
    return [p.name for p in inspect.signature(me.Bus.__init__).parameters.values() if p.name != "self"]


def test_every_bus_keyword_is_a_field_of_bus_options_in_the_same_order() -> None:
    fields = [f.name for f in attrs.fields(BusOptions)]
    keywords = _keywords()
    assert fields[: len(keywords)] == keywords


def test_every_bus_keyword_is_documented_in_the_bus_docstring() -> None:
    doc = me.Bus.__doc__ or ""
    missing = [k for k in _keywords() if f":param {k}:" not in doc]
    assert missing == []


def test_options_are_built_once_with_their_defaults(offline: pymongo.MongoClient[Any]) -> None:
    bus = me.Bus(offline.shop.orders, resume_token_id="w", max_await_time=timedelta(seconds=2))
    options = bus.options
    assert (
        options.name == "shop.orders" and options.namespace == "shop.orders" and options.level == "collection"
    )
    assert options.resume_token_key == "shop.orders:w" == bus.resume_token_key
    assert options.max_await_time == 2.0 and isinstance(options.decoder, me.CattrsDecoder)
    assert options.spec().resume_token_key == "shop.orders:w"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        options.max_workers = 3  # type: ignore[misc]


def test_the_options_that_were_bus_attributes_still_are(offline: pymongo.MongoClient[Any]) -> None:
    bus = me.Bus(
        offline.shop.orders, resume_token_id="w", max_workers=3, dead_letters=me.MemoryDeadLetterStore()
    )
    attributes = {
        name: value for name, value in vars(BusOptionAttributes).items() if isinstance(value, OptionAttribute)
    }
    assert set(attributes) >= BUS_ATTRIBUTES_BEFORE_ISSUE_17
    for name, attribute in attributes.items():
        assert getattr(bus, name) is getattr(bus.options, attribute.field), name
    assert bus.max_workers == 3 and bus.dead_letter_store is bus.options.dead_letters


def test_setting_an_option_attribute_takes_effect_at_the_next_start(
    offline: pymongo.MongoClient[Any],
) -> None:
    bus = me.Bus(offline.shop.orders, resume_token_id="w")
    bus.start_from_past = timedelta(minutes=5)
    assert bus.options.start_from_past == timedelta(minutes=5)
    assert bus.options.spec().start_from_past == timedelta(minutes=5)
