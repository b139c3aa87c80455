"""``$$NOW`` in the fake replica set is one value per command, as on a server.

Read again at every evaluation, the conditions of one claim (``$cond`` per field, each
comparing ``claimed_until`` with ``$$NOW``) disagreed when a claim expired mid-update:
the fake wrote half a claim (a new nonce under the dead owner), the release that
followed matched nothing, and a crash was counted twice (seen in CI as a poison event
dead-lettered after two crashes instead of three).
"""

from __future__ import annotations

import datetime
from typing import Any

import pymongo

from mongo_events.testing import expressions


def test_one_command_sees_one_now(server_client: pymongo.MongoClient[Any]) -> None:
    coll = server_client["shop"]["clock"]
    fields = {f"f{i}": "$$NOW" for i in range(3000)}  # long enough that a millisecond passes
    coll.update_one({"_id": 1}, [{"$set": fields}], upsert=True)
    doc = coll.find_one({"_id": 1})
    assert doc is not None
    assert len({doc[f] for f in fields}) == 1


def test_the_clock_is_fixed_inside_a_command_and_runs_outside() -> None:
    with expressions.one_clock() as fixed:
        start = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        # The real clock passes a millisecond (bounded: a few thousand reads at most).
        for _ in range(10_000_000):
            if datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - start > datetime.timedelta(
                milliseconds=2
            ):
                break
        assert expressions.server_now() == fixed
        with expressions.one_clock() as inner:  # nested: the command's value
            assert inner == fixed
        assert expressions.server_now() == fixed
    assert expressions.server_now() > fixed


def test_a_mongomock_collection_call_sees_one_now_too() -> None:
    import mongomock

    coll = mongomock.MongoClient().db.clock  # mongo_events.testing installed the expressions
    fields = {f"f{i}": "$$NOW" for i in range(3000)}
    coll.update_one({"_id": 1}, [{"$set": fields}], upsert=True)
    doc = coll.find_one({"_id": 1})
    assert doc is not None
    assert len({doc[f] for f in fields}) == 1
