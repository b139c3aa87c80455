"""What the in-process group tests share: group buses stopped at the end, and what a bus holds."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pymongo

import mongo_events as me

from ..helpers import FAST


@contextlib.contextmanager
def group_buses(client: pymongo.MongoClient[Any], **defaults: Any) -> Iterator[Callable[..., me.Bus]]:
    """``make(name, **options)`` builds a bus on ``shop.orders`` with :data:`FAST`, ``defaults``
    and ``options``; every bus made is stopped on exit (a ShutdownTimeout is the test's business)."""
    buses: list[me.Bus] = []

    def make(name: str, **options: Any) -> me.Bus:
        bus = me.Bus(client.shop.orders, **{**FAST, **defaults, "name": name, **options})
        buses.append(bus)
        return bus

    try:
        yield make
    finally:
        for bus in buses:
            with contextlib.suppress(me.ShutdownTimeout):
                bus.stop(timeout=5)


def held(bus: me.Bus) -> set[int]:
    """The partitions ``bus`` holds now."""
    status = bus.health().group
    assert status is not None
    return set(status.held)
