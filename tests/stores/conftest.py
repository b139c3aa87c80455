"""Store fixtures: every contract runs against memory, mongomock and the fake replica set."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import mongomock
import pymongo
import pytest

from mongo_events.testing import FakeReplicaSet

from ..conftest import CLIENT_OPTIONS


@pytest.fixture(params=["mongomock", "fake_rs"])
def mongo_collection(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Any]]:
    """A factory of pymongo-compatible collections: mongomock, or real pymongo on the fake."""
    if request.param == "mongomock":
        db = mongomock.MongoClient().db
        yield lambda name: db[name]
        return
    with FakeReplicaSet() as rs:
        client: pymongo.MongoClient[Any] = pymongo.MongoClient(rs.uri, **CLIENT_OPTIONS)
        yield lambda name: client.db[name]
        client.close()
