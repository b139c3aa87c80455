"""Shared fixtures: the fake replica set, clients, and the real-MongoDB fixture."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import mongomock
import pymongo
import pytest

import mongo_events as me
from mongo_events.testing import FakeReplicaSet

# mongomock 4.3 does not accept the `sort` keyword pymongo 4.11+ passes to bulk updates.
_builder = mongomock.collection.BulkOperationBuilder
for _name in ("add_update", "add_replace"):
    _orig = getattr(_builder, _name)

    def _shim(self: Any, *args: Any, _orig: Any = _orig, sort: Any = None, **kwargs: Any) -> Any:
        return _orig(self, *args, **kwargs)

    setattr(_builder, _name, _shim)

CLIENT_OPTIONS: dict[str, Any] = {
    "serverSelectionTimeoutMS": 5000,
    "connectTimeoutMS": 2000,
    "heartbeatFrequencyMS": 500,
}


@pytest.fixture
def make_bus() -> Iterator[Callable[..., me.Bus]]:
    """Builds buses with the FAST options and stops every one of them after the test."""
    from .helpers import FAST

    buses: list[me.Bus] = []

    def make(target: Any, **options: Any) -> me.Bus:
        bus = me.Bus(target, **{**FAST, **options})
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        try:
            bus.stop(timeout=5)
        except me.ShutdownTimeout:
            pass


@pytest.fixture
def fake_rs() -> Iterator[FakeReplicaSet]:
    with FakeReplicaSet() as rs:
        yield rs


@pytest.fixture
def client(fake_rs: FakeReplicaSet) -> Iterator[pymongo.MongoClient[Any]]:
    c: pymongo.MongoClient[Any] = pymongo.MongoClient(fake_rs.uri, **CLIENT_OPTIONS)
    yield c
    c.close()


def _real_uri() -> str | None:
    """A real replica set: MONGODB_URI, or one started in Docker, else skip."""
    uri = os.environ.get("MONGODB_URI")
    if uri:
        c: pymongo.MongoClient[Any] = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
        try:
            hello = c.admin.command("hello")
        except pymongo.errors.PyMongoError as exc:
            pytest.fail(f"MONGODB_URI is set but the server is unreachable: {exc}")
        finally:
            c.close()
        if "setName" not in hello and hello.get("msg") != "isdbgrid":
            pytest.fail("MONGODB_URI points at a standalone server; change streams need a replica set")
        return uri
    return None


@pytest.fixture(scope="session")
def real_mongodb_uri() -> Iterator[str]:
    uri = _real_uri()
    if uri is not None:
        yield uri
        return
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception as exc:
        pytest.skip(
            f"no real MongoDB: MONGODB_URI is unset and no Docker engine answers ({type(exc).__name__})"
        )
    from testcontainers.core.container import DockerContainer

    container = (
        DockerContainer("mongo:7.0")
        .with_command("--replSet rs0 --bind_ip_all --setParameter enableTestCommands=1")
        .with_exposed_ports(27017)
    )
    container.start()
    try:
        port = container.get_exposed_port(27017)
        host = container.get_container_host_ip()
        direct = f"mongodb://{host}:{port}/?directConnection=true"
        c: pymongo.MongoClient[Any] = pymongo.MongoClient(direct, serverSelectionTimeoutMS=20000)
        try:
            c.admin.command(
                "replSetInitiate", {"_id": "rs0", "members": [{"_id": 0, "host": "localhost:27017"}]}
            )
        except pymongo.errors.OperationFailure:
            pass
        assert wait_for(lambda: c.admin.command("hello").get("isWritablePrimary"), 60), (
            "replica set did not elect a primary"
        )
        c.close()
        yield direct
    finally:
        container.stop()


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.mongodb)])
def server_uri(request: pytest.FixtureRequest) -> Iterator[str]:
    """The fidelity fixture: the fake replica set, and a real one wherever it exists."""
    if request.param == "real":
        yield request.getfixturevalue("real_mongodb_uri")
        return
    with FakeReplicaSet() as rs:
        yield rs.uri


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.mongodb)])
def server_client(request: pytest.FixtureRequest) -> Iterator[pymongo.MongoClient[Any]]:
    """A client of the fake replica set, and of a real one (with test commands) wherever it exists.

    It has a unique ``appname``, so ``failCommand`` fail points can be limited to it;
    on a real server the ``shop`` database starts empty.
    """
    options = {**CLIENT_OPTIONS, "appname": f"t-{uuid.uuid4().hex[:10]}"}
    if request.param == "real":
        from .helpers import require_fail_points

        c: pymongo.MongoClient[Any] = pymongo.MongoClient(
            request.getfixturevalue("real_mongodb_uri"), **options
        )
        require_fail_points(c)
        c.drop_database("shop")
        yield c
        c.close()
        return
    with FakeReplicaSet() as rs:
        c = pymongo.MongoClient(rs.uri, **options)
        yield c
        c.close()


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until truthy (returns it) or ``timeout``; for state with no event to wait on.

    The default is generous because it costs nothing when the state comes: CI runs four
    suites on two cores. A test that waits for something *not* to happen passes its own.
    """
    deadline = time.monotonic() + timeout
    cond = threading.Condition()
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        with cond:
            cond.wait(interval)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--screenshots",
        action="store_true",
        help="the browser tests save the dashboard's screenshots under docs/ (for README.rst)",
    )


def _redis_server_binary() -> str | None:
    import shutil

    return shutil.which("redis-server") or next(
        (
            p
            for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server")
            if os.path.exists(p)
        ),
        None,
    )


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: ``REDIS_URL`` when set, else a ``redis-server`` started on a free loopback
    port (never 6379) for the session; skips only when no ``redis-server`` binary exists."""
    import socket
    import subprocess
    import tempfile

    import redis

    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    binary = _redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server binary (apt-get install redis-server, or set REDIS_URL)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5)

        def up() -> bool:
            if proc.poll() is not None:
                return True
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_for(up, 10, 0.05)
            if proc.poll() is not None:
                pytest.fail(
                    f"redis-server exited with {proc.returncode}: {proc.stderr.read().decode() if proc.stderr else ''}"
                )
            assert client.ping(), f"redis-server on port {port} did not answer within 10 s"
            client.close()
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    """A redis-py client (tests use a fresh key prefix each: REDIS_URL may be a shared server)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
