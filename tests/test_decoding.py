"""The cattrs decoder: a fast first try, the detailed report only for failures."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pytest

from mongo_events import DecodeError
from mongo_events.decoding import CattrsDecoder, make_converter

from .helpers import Item


@dataclasses.dataclass
class Order:
    items: list[Item]
    placed: datetime


def test_decodes_nested_documents() -> None:
    placed = datetime(2026, 1, 2, tzinfo=timezone.utc)
    order = CattrsDecoder().decode({"items": [{"sku": "a", "qty": 2}], "placed": placed, "extra": 1}, Order)
    assert order == Order([Item("a", 2)], placed)


def test_a_failure_is_reported_with_every_path() -> None:
    decoder = CattrsDecoder()
    with pytest.raises(DecodeError) as info:
        decoder.decode({"items": [{"sku": "a", "qty": "many"}, {"qty": 1}]}, Order)
    errors = info.value.errors
    assert any("$.items[0].qty" in e for e in errors)
    assert any("$.items[1].sku" in e for e in errors)
    assert any("$.placed" in e for e in errors)


def test_hooks_registered_before_the_first_decode_are_used() -> None:
    conv = make_converter()
    conv.register_structure_hook(Item, lambda v, _: Item(v["code"], 1))
    decoder = CattrsDecoder(conv)
    order = decoder.decode({"items": [{"code": "z"}], "placed": datetime(2026, 1, 1)}, Order)
    assert order.items == [Item("z", 1)]


def test_a_converter_without_detailed_validation_is_used_as_is() -> None:
    conv = make_converter()
    conv.detailed_validation = False
    decoder = CattrsDecoder(conv)
    assert decoder._fast_converter() is conv
    with pytest.raises(DecodeError):
        decoder.decode({"items": "x"}, Order)
