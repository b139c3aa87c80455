"""Who holds which partition, and when a held lease must be renewed or given up: pure logic, no I/O.

Everything here takes the time as an argument (seconds on one monotonic clock), so it is
tested deterministically; :class:`~mongo_events.groups.GroupMember` drives it with a thread.

.. versionadded:: 0.2.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import attrs

__all__ = ["assign", "max_share", "LeaseTimer", "Plan", "plan"]


def max_share(partitions: int, members: int) -> int:
    """The most partitions one member may hold: ``ceil(partitions / members)``."""
    return math.ceil(partitions / max(1, members))


def assign(
    partitions: int, members: Iterable[str], current: Mapping[int, str] | None = None
) -> dict[str, frozenset[int]]:
    """The target share of every member: even and sticky.

    ``partitions mod n`` members get ``ceil(partitions / n)`` partitions and the others
    ``floor``: those holding the most now (then by id) get the larger quotas. Every member
    keeps what it holds (``current``: partition -> holder id) up to its quota, lowest
    partitions first; the rest go, lowest partition first, to the member furthest under its
    quota (then by id). A member that joins takes only the surplus, and with one partition the
    holder stays active while the others stand by. Every member that sees the same members and
    holders computes the same map, so nothing else coordinates it.
    """
    ordered = sorted(set(members))
    if not ordered:
        return {}
    held: dict[str, list[int]] = {m: [] for m in ordered}
    for p, holder in sorted((current or {}).items()):
        if holder in held and 0 <= p < partitions:
            held[holder].append(p)
    base, extra = divmod(partitions, len(ordered))
    by_holding = sorted(ordered, key=lambda m: (-len(held[m]), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_holding)}
    shares: dict[str, set[int]] = {m: set(held[m][: quota[m]]) for m in ordered}
    taken = set().union(*shares.values())
    for p in range(partitions):
        if p in taken:
            continue
        member = min(ordered, key=lambda m: (len(shares[m]) - quota[m], m))
        shares[member].add(p)
    return {m: frozenset(share) for m, share in shares.items()}


@attrs.define
class LeaseTimer:
    """When a held lease is due for renewal and when its holder must give it up.

    Times are measured from when the last *successful* renewal was **sent**, which is no
    later than when the store applied it, so the holder's deadline falls before the
    store's expiry without comparing clocks: renew at ``ttl / 3``, give up at
    ``ttl * 2 / 3``.
    """

    ttl: float
    sent_at: float

    def renewed(self, sent_at: float) -> None:
        """A renewal sent at ``sent_at`` succeeded."""
        self.sent_at = max(self.sent_at, sent_at)

    def renew_due(self, now: float) -> bool:
        return now - self.sent_at >= self.ttl / 3

    def must_give_up(self, now: float) -> bool:
        return now - self.sent_at >= self.ttl * 2 / 3


@attrs.frozen
class Plan:
    """One step of a member: what to give up (lease lost or about to expire), release
    (rebalanced away), renew, and try to acquire, each sorted."""

    give_up: tuple[int, ...] = ()
    release: tuple[int, ...] = ()
    renew: tuple[int, ...] = ()
    acquire: tuple[int, ...] = ()


def plan(now: float, held: Mapping[int, LeaseTimer], target: Iterable[int]) -> Plan:
    """The next step for a member holding ``held`` whose share is ``target``.

    A lease past its give-up time is given up (and not renewed, even if in the target: a
    renewal might be applied after the lease expired and another member took it; the
    fence makes that safe, but this member's stream must stop first). Held partitions
    outside the target are released; due ones renewed; missing ones acquired.
    """
    wanted = set(target)
    give_up = {p for p, timer in held.items() if timer.must_give_up(now)}
    kept = {p: timer for p, timer in held.items() if p not in give_up}
    release = {p for p in kept if p not in wanted}
    renew = {p for p, timer in kept.items() if p not in release and timer.renew_due(now)}
    acquire = wanted - set(held)
    return Plan(tuple(sorted(give_up)), tuple(sorted(release)), tuple(sorted(renew)), tuple(sorted(acquire)))
