"""``configureFailPoint`` with ``failCommand``, as MongoDB's test command behaves.

Every test taking ``server_uri`` also runs against a real replica set started
with ``--setParameter enableTestCommands=1`` (it skips here). Each test limits its
fail point to its own client with ``appName``, as tests on a shared server must.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from pymongo.errors import AutoReconnect, OperationFailure, PyMongoError, WriteConcernError

from mongo_events.testing import FakeReplicaSet

from ..helpers import fail_command, require_fail_points
from .support import Listener, app_name, client


@pytest.fixture
def db_name() -> str:
    return f"t_{uuid.uuid4().hex[:8]}"


def test_error_code_and_labels_for_the_next_n_commands(server_uri: str, db_name: str) -> None:
    name = app_name()
    c = client(server_uri, appname=name, retryReads=False)
    require_fail_points(c)
    coll = c[db_name]["x"]
    coll.insert_one({"_id": 1})
    with fail_command(
        c, {"times": 2}, failCommands=["find"], errorCode=2, errorLabels=["SomeLabel"], appName=name
    ):
        for _ in range(2):
            with pytest.raises(OperationFailure) as info:
                coll.find_one({})
            assert info.value.code == 2 and info.value.has_error_label("SomeLabel")
        assert coll.find_one({}) == {"_id": 1}  # the third one passes: the fail point is off
    c.close()


def test_skip_then_always_on_until_turned_off(server_uri: str, db_name: str) -> None:
    name = app_name()
    c = client(server_uri, appname=name, retryReads=False)
    require_fail_points(c)
    coll = c[db_name]["x"]
    coll.insert_one({"_id": 1})
    with fail_command(c, {"skip": 1}, failCommands=["count", "aggregate"], errorCode=11601, appName=name):
        assert coll.count_documents({}) == 1  # skipped
        for _ in range(3):
            with pytest.raises(OperationFailure) as info:
                coll.count_documents({})
            assert info.value.code == 11601
    assert coll.count_documents({}) == 1
    c.close()


def test_configure_replies_with_the_times_entered(server_uri: str, db_name: str) -> None:
    name = app_name()
    c = client(server_uri, appname=name, retryReads=False)
    require_fail_points(c)
    with fail_command(c, "alwaysOn", failCommands=["find"], errorCode=2, appName=name) as first:
        for _ in range(2):
            with pytest.raises(OperationFailure):
                c[db_name]["x"].find_one({})
    reply = c.admin.command({"configureFailPoint": "failCommand", "mode": "off"})
    assert reply["count"] == first["count"] + 2
    c.close()


def test_app_name_limits_the_fail_point_to_one_client(server_uri: str, db_name: str) -> None:
    name = app_name()
    target = client(server_uri, appname=name, retryReads=False)
    require_fail_points(target)
    bystander = client(server_uri, appname=app_name(), retryReads=False)
    with fail_command(target, "alwaysOn", failCommands=["find"], errorCode=2, appName=name):
        assert bystander[db_name]["x"].find_one({}) is None
        with pytest.raises(OperationFailure):
            target[db_name]["x"].find_one({})
    target.close()
    bystander.close()


def test_close_connection_is_a_network_error(server_uri: str, db_name: str) -> None:
    name = app_name()
    c = client(server_uri, appname=name, retryReads=False)
    require_fail_points(c)
    with fail_command(c, {"times": 1}, failCommands=["find"], closeConnection=True, appName=name):
        with pytest.raises(AutoReconnect):
            c[db_name]["x"].find_one({})
        assert c[db_name]["x"].find_one({}) is None  # a new connection, and the fail point is spent
    c.close()


def test_block_connection_delays_then_runs_the_command(server_uri: str, db_name: str) -> None:
    name = app_name()
    c = client(server_uri, appname=name)
    require_fail_points(c)
    c[db_name]["x"].insert_one({"_id": 1})
    with fail_command(
        c, {"times": 1}, failCommands=["find"], blockConnection=True, blockTimeMS=300, appName=name
    ):
        start = time.monotonic()
        assert c[db_name]["x"].find_one({}) == {"_id": 1}
        assert time.monotonic() - start >= 0.25  # it waited out the block before answering
    c.close()


def test_write_concern_error_after_the_write(server_uri: str, db_name: str) -> None:
    name = app_name()
    c = client(server_uri, appname=name, retryWrites=False)
    require_fail_points(c)
    coll = c[db_name]["x"]
    wce = {"code": 100, "errmsg": "Not enough data-bearing nodes"}
    with fail_command(c, {"times": 1}, failCommands=["insert"], writeConcernError=wce, appName=name):
        with pytest.raises(WriteConcernError) as info:
            coll.insert_one({"_id": 1})
    assert info.value.code == 100
    assert coll.find_one({"_id": 1}) == {"_id": 1}  # the write itself was applied
    c.close()


def test_server_labels_when_the_fail_point_names_none(server_uri: str, db_name: str) -> None:
    """Without ``errorLabels`` the server attaches its own: what pymongo's retries and resumes read."""
    name = app_name()
    listener = Listener()
    c = client(server_uri, appname=name, retryReads=False, event_listeners=[listener])
    require_fail_points(c)
    coll = c[db_name]["x"]
    coll.insert_one({"_id": 0})
    # A retryable write failing with a retryable code: labelled, and pymongo's one retry succeeds.
    with fail_command(c, {"times": 1}, failCommands=["insert"], errorCode=91, appName=name):
        coll.insert_one({"_id": 1})
    (failed_insert,) = [f for f in listener.failures if f.command_name == "insert"]
    assert "RetryableWriteError" in failed_insert.failure.get("errorLabels", [])
    # A change stream's aggregate failing with a retryable code is resumable.
    # (91 is a "not primary" code too: pymongo raises NotPrimaryError, an AutoReconnect.)
    with fail_command(c, {"times": 1}, failCommands=["aggregate"], errorCode=91, appName=name):
        with pytest.raises(PyMongoError) as err:
            coll.watch()
    assert err.value.details is not None and err.value.details["code"] == 91
    assert err.value.has_error_label("ResumableChangeStreamError")
    # 280 and 286 are never resumable.
    with fail_command(c, {"times": 1}, failCommands=["aggregate"], errorCode=286, appName=name):
        with pytest.raises(OperationFailure) as info:
            coll.watch()
    assert info.value.has_error_label("NonResumableChangeStreamError")
    # An explicit empty errorLabels suppresses them all.
    with fail_command(
        c, {"times": 1}, failCommands=["aggregate"], errorCode=91, errorLabels=[], appName=name
    ):
        with pytest.raises(PyMongoError) as err:
            coll.watch()
    assert not err.value.has_error_label("ResumableChangeStreamError")
    c.close()


def test_bad_modes_and_unknown_fail_points_are_refused(server_uri: str) -> None:
    c = client(server_uri)
    require_fail_points(c)
    with pytest.raises(OperationFailure):
        c.admin.command(
            {"configureFailPoint": "failCommand", "mode": "sometimes", "data": {"failCommands": ["find"]}}
        )
    with pytest.raises(OperationFailure):
        c.admin.command({"configureFailPoint": "noSuchFailPointAnywhere", "mode": "alwaysOn"})
    c.close()


def test_diagnostic_commands_answer_minimally(server_uri: str) -> None:
    c = client(server_uri)
    assert c.admin.command({"getParameter": 1, "enableTestCommands": 1})["enableTestCommands"] in (
        True,
        False,
        1,
        0,
    )
    opts = c.admin.command("getCmdLineOpts")
    assert isinstance(opts["argv"], list) and "parsed" in opts
    status = c.admin.command("serverStatus")
    assert status["process"] in ("mongod", "mongod.exe") and status["uptime"] >= 0 and "version" in status
    assert status["connections"]["current"] >= 1  # this client's own
    c.close()


# -- fake-only -----------------------------------------------------------------------


def test_without_test_commands_there_are_no_fail_points() -> None:
    with FakeReplicaSet(test_commands=False) as rs:
        c = client(rs.uri)
        assert c.admin.command({"getParameter": 1, "enableTestCommands": 1})["enableTestCommands"] is False
        with pytest.raises(OperationFailure) as info:
            c.admin.command(
                {"configureFailPoint": "failCommand", "mode": "alwaysOn", "data": {"failCommands": ["find"]}}
            )
        assert info.value.code == 59
        assert "setParameter" not in c.admin.command("getCmdLineOpts")["parsed"]
        c.close()


def test_a_resumable_get_more_error_makes_pymongo_resume(fake_rs: FakeReplicaSet) -> None:
    name = app_name()
    listener = Listener()
    c = client(fake_rs.uri, appname=name, event_listeners=[listener])
    coll = c.db.orders
    coll.insert_one({"_id": 0})
    with coll.watch(max_await_time_ms=100) as stream:
        with fail_command(
            c,
            {"times": 1},
            failCommands=["getMore"],
            errorCode=91,
            errorLabels=["ResumableChangeStreamError"],
            appName=name,
        ):
            coll.insert_one({"_id": 1})
            doc: Any = None
            deadline = time.monotonic() + 5
            while doc is None and time.monotonic() < deadline:
                doc = stream.try_next()
    assert doc is not None and doc["documentKey"] == {"_id": 1}
    assert len(listener.of("aggregate")) == 2  # it resumed once
    c.close()


def test_the_fake_enables_test_commands_by_default(fake_rs: FakeReplicaSet) -> None:
    c = client(fake_rs.uri)
    assert c.admin.command({"getParameter": 1, "enableTestCommands": 1})["enableTestCommands"] is True
    assert c.admin.command("getCmdLineOpts")["parsed"]["setParameter"] == {"enableTestCommands": "1"}
    c.close()
