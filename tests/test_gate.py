"""A consumer group's gate (is this partition's lease held?) closes by the clock when a renewal
is late, before the member gives the partition up or renews it after all. Both its readers, the
watcher and the workers, must neither skip nor drop what arrives meanwhile, nor stop for good."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import pymongo

from mongo_events.dispatch import WorkItem
from mongo_events.subscription import Subscription
from mongo_events.tracking import Slot, Tracker
from mongo_events.watcher import Position, Watcher

from .helpers import change_event, make_dispatcher


def test_an_event_declined_while_not_stopping_is_offered_again_and_no_token_passes_it(
    client: pymongo.MongoClient[Any],
) -> None:
    # A consumer-group partition's gate closes by the clock when its lease renewal is late,
    # before the member thread gives the partition up (or renews it after all): on_event
    # declines while nothing asked the watcher to stop. It used to reopen the stream *after*
    # the declined event, and the idle post-batch token that followed became the checkpoint
    # that the final flush wrote: the event was lost for the partition's next owner.
    coll = client.shop.orders
    stop = threading.Event()
    connected, all_taken = threading.Event(), threading.Event()
    offered: list[int] = []
    taken: list[int] = []
    declined = {"pending": False}
    tokens_while_declined: list[Any] = []

    def on_event(raw: Mapping[str, Any]) -> bool:
        doc_id = raw["documentKey"]["_id"]
        offered.append(doc_id)
        if doc_id == 2 and offered.count(2) <= 2:  # the gate is closed for its first two offers
            declined["pending"] = True
            return False
        declined["pending"] = False
        taken.append(doc_id)
        if len(taken) == 3:
            all_taken.set()
        return True

    def on_resume_token(token: Any) -> None:
        if declined["pending"]:
            tokens_while_declined.append(token)

    watcher = Watcher(
        name="t",
        open_stream=lambda position: coll.watch(max_await_time_ms=50, **position.kwargs()),
        on_event=on_event,
        on_resume_token=on_resume_token,
        on_error=lambda kind, exc, position: None,
        on_connected=lambda exc: connected.set(),
        stop_event=stop,
        min_backoff=0.01,
    )
    watcher.start(Position())
    try:
        assert connected.wait(5)
        coll.insert_many([{"_id": 1}, {"_id": 2}, {"_id": 3}])
        assert all_taken.wait(10), f"offered {offered}, taken {taken}"
    finally:
        stop.set()
        assert watcher.join(5)
    assert taken == [1, 2, 3]
    assert offered == [1, 2, 2, 2, 3]  # declined twice, then offered again and taken
    # No post-batch token was noted while event 2 waited declined: such a token (the
    # reopened stream's, past event 2) would become the checkpoint.
    assert tokens_while_declined == []


def _one_item(
    done: list[Slot], gate: Callable[[], bool], callback: Callable[[Any], None], **options: Any
) -> tuple[Any, Slot]:
    """A started one-worker dispatcher behind ``gate``, with one item of ``callback`` enqueued
    (returned with the item's slot)."""
    dispatcher = make_dispatcher(done, gate=gate, **options)
    event = change_event(1)
    dispatcher.start()
    slot = Tracker(10).begin("t1", None, 1, event.id)
    dispatcher.enqueue(WorkItem(Subscription(callback, name="s", index=0), event, slot, None, None))
    return dispatcher, slot


def _halt_waits_for_the_busy_worker(dispatcher: Any, release: threading.Event) -> None:
    """Halt: the stopper sees the worker busy until ``release`` lets it go, then idle and ended."""
    dispatcher.halt()
    assert not dispatcher.wait_idle(time.monotonic() + 0.2)  # the stopper sees it busy
    release.set()
    assert dispatcher.wait_idle(time.monotonic() + 5)
    assert dispatcher.join(time.monotonic() + 5)


def test_a_worker_holds_an_item_while_the_gate_is_closed_and_runs_it_when_it_opens() -> None:
    # A worker that found the gate closed used to return from its loop, dropping the item:
    # after a late renewal the partition had fewer workers (none, at last) and a slot that
    # never finished, so its checkpoint stopped under a running bus.
    done: list[Slot] = []
    ran = threading.Event()
    gate = threading.Event()  # closed
    lock = threading.RLock()
    dispatcher, slot = _one_item(done, gate.is_set, lambda ev: ran.set(), lock=lock)
    try:
        assert not ran.wait(0.2)  # not delivered while the lease is overdue
        gate.set()  # renewed late
        assert ran.wait(5)
        dispatcher.halt()
        assert dispatcher.join(time.monotonic() + 5)
    finally:
        dispatcher.halt()
    with lock:
        dispatcher.drain()
    assert done == [slot]


def test_a_worker_holding_an_item_behind_a_closed_gate_ends_when_halted_leaving_it_undone() -> None:
    done: list[Slot] = []
    ran = threading.Event()
    asked: list[int] = []
    asked_again = threading.Event()

    def gate() -> bool:  # the partition is given up
        asked.append(1)
        if len(asked) >= 2:
            asked_again.set()
        return False

    dispatcher, _ = _one_item(done, gate, lambda ev: ran.set())
    # Asked again: the worker waits for the gate to reopen. It runs no callback meanwhile,
    # so a stop must neither wait for it nor name it as given up.
    assert asked_again.wait(5)
    assert dispatcher.running() == [] and dispatcher.abandoned() is None
    dispatcher.halt()
    assert dispatcher.join(time.monotonic() + 5)  # the worker ended at the halt
    assert not ran.is_set() and not done  # undone: the next owner delivers it


def test_a_halt_while_a_worker_passes_the_gate_is_seen_by_one_side() -> None:
    # A worker took an item, checked the halt flag, and was in the gate when the stopper
    # halted and asked whether any callback ran: none was marked busy yet, so wait_idle()
    # said idle, the partition's final checkpoint and lease release went ahead, and the
    # callback then ran beside the next owner's redelivery. Now the worker is busy before
    # it checks, and checks the halt after the gate.
    done: list[Slot] = []
    ran = threading.Event()
    in_gate, release = threading.Event(), threading.Event()

    def gate() -> bool:
        in_gate.set()
        assert release.wait(10)
        return True

    dispatcher, _ = _one_item(done, gate, lambda ev: ran.set())
    try:
        assert in_gate.wait(5)
        _halt_waits_for_the_busy_worker(dispatcher, release)
    finally:
        release.set()
        dispatcher.halt()
    assert not ran.is_set() and not done  # halted before its callback: undone, for the next owner


def test_a_worker_whose_gate_reopens_is_busy_again_for_its_callback() -> None:
    # While the worker waits for a closed gate it is not busy; once the gate reopens and
    # its callback runs, a stop must see it busy again and wait for it.
    done: list[Slot] = []
    entered, release = threading.Event(), threading.Event()
    asked: list[int] = []

    def gate() -> bool:  # closed once (a late renewal), then open
        asked.append(1)
        return len(asked) > 1

    def callback(ev: Any) -> None:
        entered.set()
        assert release.wait(10)

    dispatcher, _ = _one_item(done, gate, callback)
    try:
        assert entered.wait(5)
        assert dispatcher.running() != []
        _halt_waits_for_the_busy_worker(dispatcher, release)
    finally:
        release.set()
        dispatcher.halt()
