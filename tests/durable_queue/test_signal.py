"""The Redis doorbell, with a real redis-server: it wakes idle consumers; without it they poll."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pymongo
import pytest

import mongo_events as me
from mongo_events.queue import Queue, RedisSignal

from ..conftest import wait_for
from ..helpers import Recorder


@pytest.fixture
def coll(client: pymongo.MongoClient[Any]) -> Any:
    return client.shop.messages


@pytest.fixture
def prefix() -> str:
    return f"_sig:{uuid.uuid4().hex[:8]}:"  # REDIS_URL may be a shared server


@pytest.fixture
def stopping() -> Iterator[list[Queue]]:
    made: list[Queue] = []
    yield made
    for q in made:
        q.stop(timeout=5)


def _dead_redis_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{sock.getsockname()[1]}/0"  # nothing listens there


def test_signal_wakes_an_idle_consumer_long_before_its_poll(
    coll: Any, redis_url: str, prefix: str, stopping: list[Queue]
) -> None:
    got = Recorder()
    consumer = Queue(coll, signal=RedisSignal(redis_url, prefix=prefix), poll_interval=3600)
    stopping.append(consumer)
    consumer.subscribe(lambda p: got.add(p["n"]), event="e")
    consumer.start()
    assert wait_for(lambda: consumer.health().signal == "up")
    assert consumer.health().status == "healthy"
    # A publisher in another Queue (no local wake-up): only Redis can tell the consumer.
    publisher = Queue(coll, signal=RedisSignal(redis_url, prefix=prefix))
    for n in range(3):
        publisher.publish("e", {"n": n})
        got.wait(n + 1, timeout=10)  # the poll is an hour away
    assert got.items == [0, 1, 2]
    assert publisher.signal_failures == 0


def test_ring_goes_to_the_prefixed_channel(redis_client: Any, redis_url: str, prefix: str) -> None:
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"{prefix}order.placed")
    RedisSignal(redis_url, prefix=prefix).ring("order.placed", "abc")
    message = None
    for _ in range(50):  # bounded: get_message waits up to 0.1 s each
        message = pubsub.get_message(timeout=0.1)
        if message is not None:
            break
    pubsub.close()
    assert message is not None and message["data"] == b"abc"


def test_without_redis_the_queue_polls_and_reports_degraded(coll: Any, stopping: list[Queue]) -> None:
    got = Recorder()
    consumer = Queue(coll, signal=RedisSignal(_dead_redis_url()), poll_interval=0.05)
    stopping.append(consumer)
    consumer.subscribe(lambda p: got.add(p["n"]), event="e")
    consumer.start()
    publisher = Queue(coll, signal=RedisSignal(_dead_redis_url()))
    seq = publisher.publish("e", {"n": 1})  # stored although the signal fails
    assert publisher.signal_failures == 1 and publisher.health().last_error is not None
    assert coll.find_one()["_id"] == __import__("bson").ObjectId(seq)
    assert got.wait(1, timeout=10) == [1]
    assert consumer.health().status == "degraded" and consumer.health().signal == "down"


def test_redis_back_after_an_outage_wakes_consumers_again(
    coll: Any, stopping: list[Queue], tmp_path: Any
) -> None:
    """A redis-server of its own, stopped and restarted on the same port: the doorbell comes back."""
    import shutil
    import subprocess

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server binary")
    url = _dead_redis_url()
    port = url.rsplit(":", 1)[1].split("/")[0]

    def server() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                binary,
                "--port",
                port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    got = Recorder()
    proc = server()
    try:
        consumer = Queue(coll, signal=RedisSignal(url), poll_interval=3600)
        stopping.append(consumer)
        consumer.subscribe(lambda p: got.add(p["n"]), event="e")
        consumer.start()
        assert wait_for(lambda: consumer.health().signal == "up", 10)
        proc.terminate()
        proc.wait(10)
        assert wait_for(lambda: consumer.health().status == "degraded", 10)
        Queue(coll).publish("e", {"n": 1})  # no signal at all: stays pending until a wake-up
        proc = server()
        # Back: the listener resubscribes and wakes the consumer, which finds the message.
        assert got.wait(1, timeout=15) == [1]
        assert wait_for(lambda: consumer.health().status == "healthy", 10)
    finally:
        proc.terminate()
        proc.wait(10)
    assert isinstance(consumer.health(), me.QueueHealth)
