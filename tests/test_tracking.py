"""The tracker: window, watermark and lanes, as pure logic."""

from __future__ import annotations

import pytest

from mongo_events.tracking import Lanes, Tracker


def tok(n: int) -> dict[str, str]:
    return {"_data": f"{n:04d}"}


def test_checkpoint_never_passes_an_unfinished_event() -> None:
    t = Tracker(capacity=200)
    slots = [t.begin(tok(i), i, 1) for i in range(1, 101)]
    for slot in slots[1:]:
        t.finish(slot)
    assert t.advance() == 0
    assert t.checkpoint is None and len(t) == 100
    assert not t.head_done
    assert t.finish(slots[0]) is True
    assert t.head_done
    assert t.advance() == 100
    assert not t.head_done
    assert t.checkpoint == tok(100) and t.checkpoint_time == 100 and t.idle


def test_window_counts_finished_events_behind_a_blocked_one() -> None:
    t = Tracker(capacity=3)
    a, b, c = (t.begin(tok(i), i, 1) for i in range(3))
    t.finish(b)
    t.finish(c)
    t.advance()
    assert t.full  # b and c are done but a holds the window shut
    t.finish(a)
    t.advance()
    assert t.idle and t.full  # all done, but a crash now would redeliver all three
    t.persisted(3)
    assert not t.full and len(t) == 0


def test_without_a_store_nothing_waits_on_a_flush() -> None:
    t = Tracker(capacity=2, durable=False)
    for i in range(2):
        t.finish(t.begin(tok(i), i, 1))
    t.advance()
    assert not t.full and t.unflushed == 0


def test_several_subscriptions_must_all_finish() -> None:
    t = Tracker(capacity=10)
    s = t.begin(tok(1), 1, 2)
    assert t.finish(s) is False
    t.advance()
    assert t.checkpoint is None
    assert t.finish(s) is True
    t.advance()
    assert t.checkpoint == tok(1)


def test_filtered_event_is_done_at_once() -> None:
    t = Tracker(capacity=10)
    t.begin(tok(1), 1, 0)
    assert t.advance() == 1 and t.checkpoint == tok(1)


def test_idle_post_batch_token_moves_checkpoint_only_when_nothing_in_flight() -> None:
    t = Tracker(capacity=10)
    t.note_resume_token(tok(5))
    assert t.checkpoint == tok(5) and not t.moved_by_events
    s = t.begin(tok(6), 6, 1)
    t.note_resume_token(tok(9))  # a post-batch token while event 6 is in flight
    assert t.checkpoint == tok(5)
    t.finish(s)
    t.advance()
    assert t.checkpoint == tok(9)  # everything before the post-batch token was done


def test_invalidate_never_becomes_the_checkpoint() -> None:
    t = Tracker(capacity=10)
    drop = t.begin(tok(1), 1, 1)
    inv = t.begin(None, 1, 1)
    t.finish(drop)
    t.finish(inv)
    t.advance()
    assert t.checkpoint == tok(1)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Tracker(0)


def test_lanes_run_one_item_per_key_in_order() -> None:
    lanes: Lanes[str] = Lanes()
    assert lanes.push("k", "a") == "a"
    assert lanes.push("k", "b") is None
    assert lanes.push("k", "c") is None
    assert lanes.push("other", "x") == "x"
    assert lanes.pop_next("k") == "b"
    assert lanes.pop_next("k") == "c"
    assert lanes.pop_next("k") is None
    assert lanes.push("k", "d") == "d"  # the lane was released
    assert lanes.discard("other") == []


def test_unfinished_counts_events_some_subscription_still_owes() -> None:
    t = Tracker(capacity=10)
    filtered = t.begin(tok(1), 1, 0)  # nobody wanted it: never pending
    two = t.begin(tok(2), 2, 2)
    one = t.begin(tok(3), 3, 1)
    assert filtered.done and t.unfinished == 2
    t.finish(two)
    assert t.unfinished == 2  # one of its two subscriptions is still at it
    t.finish(one)
    t.finish(two)
    assert t.unfinished == 0
    t.advance()
    assert t.unfinished == 0 and len(t) == 3  # done, though not yet stored
