"""``me.collection_filter``: Go's ``CollectionFilterPipeline``, through the fake replica set."""

from __future__ import annotations

from typing import Any

import pymongo
import pytest

import mongo_events as me

from .helpers import Recorder


def test_the_stage_has_gos_shape() -> None:
    assert me.collection_filter("orders", "customers", database="shop") == {
        "$match": {"ns.db": "shop", "ns.coll": {"$in": ["orders", "customers"]}}
    }
    assert me.collection_filter("orders") == {"$match": {"ns.coll": {"$in": ["orders"]}}}


@pytest.mark.parametrize("args", [(), ("",), (None,)])
def test_no_collection_is_an_error_not_a_watch_of_everything(args: tuple[Any, ...]) -> None:
    with pytest.raises(me.ConfigurationError):
        me.collection_filter(*args)
    with pytest.raises(me.ConfigurationError):
        me.collection_filter("orders", database="")


def test_a_database_bus_sees_only_the_named_collections(
    client: pymongo.MongoClient[Any], make_bus: Any
) -> None:
    seen = Recorder()
    bus = make_bus(client.shop, pipeline=[me.collection_filter("orders", "customers")])
    bus.subscribe(lambda ev: seen.add((ev.collection, ev.document_id)), name="h")
    bus.start()
    client.shop.invoices.insert_one({"_id": "skipped"})
    client.shop.orders.insert_one({"_id": 1})
    client.shop.invoices.insert_one({"_id": "skipped too"})
    client.shop.customers.insert_one({"_id": 2})
    client.shop.orders.insert_one({"_id": 3})
    # Different documents run in parallel (per-document order only): compare as a set.
    assert set(seen.wait(3)) == {("orders", 1), ("customers", 2), ("orders", 3)}
    assert bus.join(5)
    assert ("invoices", "skipped") not in seen.items and len(seen) == 3


def test_a_cluster_bus_with_a_database(client: pymongo.MongoClient[Any], make_bus: Any) -> None:
    seen = Recorder()
    bus = make_bus(client, pipeline=[me.collection_filter("orders", database="shop")])
    bus.subscribe(lambda ev: seen.add(ev.namespace), name="h")
    bus.start()
    client.other.orders.insert_one({"_id": 1})
    client.shop.orders.insert_one({"_id": 1})
    client.shop.orders.insert_one({"_id": 2})
    assert sorted(seen.wait(2)) == ["shop.orders", "shop.orders"]
    assert bus.join(5)
    assert len(seen) == 2
