"""The watcher's contract with ``on_event``: an event it declines is never stepped over."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pymongo

from mongo_events.watcher import Position, Watcher


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
