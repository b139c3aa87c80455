"""The assignment and lease-timing logic, pure and deterministic."""

from __future__ import annotations

import itertools
import math

import pytest

from mongo_events.groups import LeaseTimer, Plan, assign, max_share, plan


@pytest.mark.parametrize(("k", "n"), list(itertools.product(range(1, 13), range(1, 6))))
def test_every_partition_has_one_owner_and_shares_are_even(k: int, n: int) -> None:
    members = [f"m{i}" for i in range(n)]
    shares = assign(k, members)
    assert sorted(p for share in shares.values() for p in share) == list(range(k))
    assert all(k // n <= len(share) <= math.ceil(k / n) == max_share(k, n) for share in shares.values())


def test_the_same_view_gives_the_same_map_in_any_order() -> None:
    current = {0: "b", 1: "b", 2: "a"}
    assert assign(6, ["c", "a", "b"], current) == assign(
        6, ["b", "c", "a", "a"], dict(reversed(current.items()))
    )


def test_a_joining_member_takes_only_the_surplus() -> None:
    before = assign(8, ["a", "b"])
    current = {p: m for m, share in before.items() for p in share}
    after = assign(8, ["a", "b", "c"], current)
    moved = [p for p in range(8) if current[p] != next(m for m, s in after.items() if p in s)]
    assert len(after["c"]) == len(moved) == 2  # 8 over 3: sizes 3, 3, 2; only c's two moved
    assert sorted(len(s) for s in after.values()) == [2, 3, 3]


def test_a_leaving_member_s_partitions_are_spread_and_the_rest_stay() -> None:
    before = assign(6, ["a", "b", "c"])
    current = {p: m for m, share in before.items() for p in share}
    after = assign(6, ["a", "b"], {p: m for p, m in current.items() if m != "c"})
    assert after["a"] >= before["a"] and after["b"] >= before["b"]
    assert len(after["a"]) == len(after["b"]) == 3


def test_an_overloaded_holder_gives_up_to_the_idle_member() -> None:
    # a and b hold two each, c joins: 4 over 3 is 2, 1, 1; b gives one to c.
    after = assign(4, ["a", "b", "c"], {0: "a", 1: "a", 2: "b", 3: "b"})
    assert after == {"a": frozenset({0, 1}), "b": frozenset({2}), "c": frozenset({3})}


def test_one_partition_is_active_standby_and_sticky() -> None:
    assert assign(1, ["b", "a"]) == {"a": frozenset({0}), "b": frozenset()}
    # the holder stays active when a member with a lower id joins
    assert assign(1, ["a", "b", "z"], {0: "z"}) == {"a": frozenset(), "b": frozenset(), "z": frozenset({0})}
    # a dead holder (not among the live members) loses it to the lowest id
    assert assign(1, ["b", "c"], {0: "a"})["b"] == frozenset({0})


def test_no_members_no_map() -> None:
    assert assign(4, []) == {}


def test_lease_timer_renews_at_a_third_and_gives_up_at_two_thirds() -> None:
    timer = LeaseTimer(9.0, 100.0)
    assert not timer.renew_due(102.9) and timer.renew_due(103.0)
    assert not timer.must_give_up(105.9) and timer.must_give_up(106.0)
    timer.renewed(104.0)
    assert not timer.must_give_up(109.9) and timer.must_give_up(110.0)
    timer.renewed(101.0)  # a late answer to an older renewal never moves the deadline back
    assert timer.sent_at == 104.0


def test_plan_gives_up_releases_renews_and_acquires() -> None:
    held = {
        0: LeaseTimer(9.0, 100.0),
        1: LeaseTimer(9.0, 95.0),
        2: LeaseTimer(9.0, 101.0),
        3: LeaseTimer(9.0, 103.5),
    }
    step = plan(104.0, held, {0, 1, 3, 5})
    # 1 is overdue (9 s ttl, sent 9 s ago): given up, not renewed; 2 was rebalanced away;
    # 0 is due (4 s > 3 s); 3 is fresh; 5 is missing.
    assert step == Plan(give_up=(1,), release=(2,), renew=(0,), acquire=(5,))
