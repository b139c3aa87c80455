"""A member of a consumer group: heartbeats, takes its share of the partitions' leases, renews them.

.. versionadded:: 0.2.0
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import pymongo

from ..errors import StoreError
from ..guard import describe, run_guarded
from .assignment import LeaseTimer, assign, plan
from .base import GroupConfig, GroupMismatch, Lease, LeaseStore, Owner, check_ttl
from .partitioning import PartitionMode

__all__ = ["GroupMember", "partition_key"]

log = logging.getLogger(__name__)

#: Why a partition is revoked, as ``on_revoked_why`` is told.
REBALANCED = "a rebalance moved it to another member"
STOPPING = "the member is stopping"

#: Heartbeats of members gone for this many ttls are deleted (by any member, this often).
SWEEP_AFTER = 10


def partition_key(group: str, namespace: str, partition: int) -> str:
    """A partition's lease and checkpoint key: ``"<group>:<namespace>#<p>"``."""
    return f"{group}:{namespace}#{partition}"


class GroupMember:
    """One member of consumer group ``group`` for the change stream of ``namespace``.

    Every :meth:`tick` (its thread runs one every ``poll_interval``) the member renews its
    heartbeat lease, reads the live members, computes its share (:func:`assign`), then gives
    up leases it can no longer trust, releases partitions rebalanced away, renews due leases
    and tries to take the partitions of its share that it lacks. It calls:

    - ``on_assigned(partition, fence)`` after taking a partition's lease: start that
      partition's stream consumer, with its checkpoints fenced by ``fence``
      (:class:`~mongo_events.groups.FencedResumeTokenStore`);
    - ``on_revoked(partition)`` before releasing it (rebalance, :meth:`stop`) and when its
      lease is lost or could not be renewed within ``ttl * 2 / 3``: stop that consumer,
      deliver and write nothing more for it. It must return well within ``ttl / 3``.
      With ``on_revoked_why``, that is called instead, with why (``"a rebalance moved it to
      another member"``, ``"the member is stopping"``, or why it was given up).

    Both run on the member's thread (or the caller of :meth:`tick` / :meth:`stop`).
    An exception from a callback, or anything else escaping the loop, releases every lease
    (best effort) and is handed to ``on_fatal`` (default: logged and kept in :attr:`error`):
    the member never dies silently. A store that fails is not fatal: the leases it cannot
    renew are given up in time and the member keeps trying; that includes joining the group
    (a member that has not joined yet takes nothing and tries again at every poll). Only
    :class:`~mongo_events.groups.GroupMismatch` is fatal.

    Every store call runs under ``pymongo.timeout()``, at most ``ttl / 6`` and never past the
    earliest give-up time of a held lease, and overdue leases are given up before each call:
    a slow or unreachable store cannot keep a partition past ``ttl * 2 / 3`` plus one poll.

    :param store: the lease store (``MongoLeaseStore`` on ``_event_leases``).
    :param group: the group's name.
    :param namespace: what the group watches (``db.coll``), part of the partition keys.
    :param partitions: ``K``, fixed for the group (checked against the group document).
    :param ttl: lease time to live, seconds (the issue's ``lease_ttl``).
    :param mode: where partitions are split, fixed for the group.
    :param on_rebalance: called with the new share whenever it changes (counted in :attr:`rebalances`).
    :param on_releasing: called with every partition a rebalance is about to release, before
        their ``on_revoked`` calls (one at a time): stop them all at once, so that together they
        take no longer than one, and the member renews its other leases in time.
    :param on_revoked_why: ``on_revoked`` with the reason, called instead of it when given.
    :param poll_interval: seconds between ticks (default ``ttl / 12``).
    :param clock: monotonic seconds; tests pass a fake clock and call :meth:`tick` themselves.

    .. versionadded:: 0.2.0
    """

    def __init__(
        self,
        store: LeaseStore,
        group: str,
        namespace: str,
        *,
        partitions: int = 1,
        ttl: float = 10.0,
        mode: PartitionMode = PartitionMode.SERVER,
        on_assigned: Callable[[int, int], None] = lambda partition, fence: None,
        on_revoked: Callable[[int], None] = lambda partition: None,
        on_fatal: Callable[[BaseException], None] | None = None,
        on_rebalance: Callable[[frozenset[int]], None] | None = None,
        on_releasing: Callable[[tuple[int, ...]], None] | None = None,
        on_revoked_why: Callable[[int, str], None] | None = None,
        owner: Owner | None = None,
        poll_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_ttl(ttl)
        if not isinstance(group, str) or not group or ":" in group or "/" in group:
            raise ValueError(f"group must be a non-empty name without ':' or '/', not {group!r}")
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ValueError(f"partitions must be a positive int, not {partitions!r}")
        self.store = store
        self.config = GroupConfig(group, partitions, PartitionMode(mode), namespace=namespace)
        self.namespace = namespace
        #: ``"<group> on <namespace>"``, for log lines (one process may run several groups of one name).
        self.label = f"{group} on {namespace}"
        self.ttl = float(ttl)
        self.poll_interval = float(poll_interval) if poll_interval is not None else self.ttl / 12
        self.owner = owner or Owner.here()
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self._on_fatal = on_fatal
        self._on_rebalance = on_rebalance
        self._on_releasing = on_releasing
        self._on_revoked_why = on_revoked_why
        self._clock = clock
        self._leases: dict[int, Lease] = {}
        self._timers: dict[int, LeaseTimer] = {}
        self._heartbeat: Lease | None = None
        self._heartbeat_timer: LeaseTimer | None = None
        self._joined = False
        self._next_sweep = 0.0  # set at the join: the first sweep is SWEEP_AFTER ttls later
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        #: The live members (by owner id) as last seen.
        self.members: tuple[str, ...] = ()
        #: How many times this member's share changed.
        self.rebalances = 0
        #: What stopped the member, when something escaped its loop.
        self.error: BaseException | None = None
        self._share: frozenset[int] = frozenset()

    # -- reading ---------------------------------------------------------

    @property
    def owned(self) -> dict[int, int]:
        """The partitions held now, with their fences."""
        with self._lock:
            return {p: lease.fence for p, lease in self._leases.items()}

    def holds(self, partition: int) -> bool:
        """True while ``partition``'s lease is held and not past its give-up time, by this
        member's clock, without I/O: check it before delivering an event of the partition,
        so that a process that wakes up from a pause delivers nothing once its lease is overdue
        (even before its thread has run ``on_revoked``)."""
        timer = self._timers.get(partition)  # no lock: the thread may be inside a store call
        return timer is not None and not timer.must_give_up(self._clock())

    def key(self, partition: int) -> str:
        return partition_key(self.config.name, self.namespace, partition)

    def _partition_prefix(self) -> str:
        return partition_key(self.config.name, self.namespace, 0)[:-1]

    def _member_prefix(self) -> str:
        # The group's name *and* target: members of one name on other collections are not
        # members of this group (they would be given partitions they never take).
        return f"{self.config.name}:{self.namespace}/members/"

    # -- one step --------------------------------------------------------

    def tick(self) -> None:
        """One step of the protocol (see the class docstring); the thread calls it every poll."""
        with self._lock:
            if not self._joined:
                try:
                    with self._bounded():
                        self.config = self.store.join_group(self.config)
                except GroupMismatch:
                    raise  # a misconfigured member: fatal, and at once from start()
                except StoreError as exc:
                    # Not fatal, like every other store failure: the first call of a new client
                    # (server selection, handshake) may well take longer than ttl / 6 on a busy
                    # host; a member that died of it would leave its share to the others forever.
                    log.warning(
                        "group %s: %s could not join yet, it takes no partition until it does"
                        " (trying again at every poll): %s",
                        self.label,
                        self.owner,
                        describe(exc),
                    )
                    return
                self._joined = True
                self._next_sweep = self._clock() + SWEEP_AFTER * self.ttl
            self._give_up_overdue()
            self._beat()
            try:
                with self._bounded():
                    live = self.store.live(self._member_prefix())
                with self._bounded():
                    holders = self.store.live(self._partition_prefix())
            except StoreError as exc:
                log.warning("group %s: could not read the members: %s", self.label, describe(exc))
                self._give_up_overdue()
                return
            ids = {owner.id for owner in live.values()} | {self.owner.id}
            self.members = tuple(sorted(ids))
            suffixes = {key.rsplit("#", 1)[1]: owner.id for key, owner in holders.items()}
            current = {int(p): holder for p, holder in suffixes.items() if p.isdigit()}
            share = assign(self.config.partitions, ids, current)[self.owner.id]
            if share != self._share:
                self.rebalances += 1
                self._share = share
                if self._on_rebalance is not None:
                    self._on_rebalance(share)
            step = plan(self._clock(), self._timers, share)
            for p in step.give_up:
                self._lose(p, "its lease could not be renewed in time")
            if step.release and self._on_releasing is not None:
                self._on_releasing(step.release)  # all of them, before the first on_revoked
            for p in step.release:
                self._release(p, REBALANCED)
            for p in step.renew:
                self._renew(p)
            for p in step.acquire:
                self._acquire(p)
            self._give_up_overdue()
            self._sweep()  # last: its call must not eat the time of a renewal that is due

    def _sweep(self) -> None:
        """Delete the heartbeats of members gone for ``SWEEP_AFTER`` ttls (every process start
        leaves one; killed or stopped, they would pile up), every ``SWEEP_AFTER`` ttls."""
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_AFTER * self.ttl
        try:
            with self._bounded():
                gone = self.store.forget(self._member_prefix(), SWEEP_AFTER * self.ttl)
        except StoreError as exc:
            log.warning("group %s: could not delete old member heartbeats: %s", self.label, describe(exc))
            return
        if gone:
            log.debug("group %s: deleted %d heartbeat(s) of members gone", self.label, gone)

    def _beat(self) -> None:
        now = self._clock()
        if self._heartbeat_timer is not None and not self._heartbeat_timer.renew_due(now):
            return
        try:
            with self._bounded():
                lease = self.store.acquire(self._member_prefix() + self.owner.id, self.owner, self.ttl)
        except StoreError as exc:
            log.warning("group %s: heartbeat failed: %s", self.label, describe(exc))
            return
        if lease is not None:
            self._heartbeat = lease
            self._heartbeat_timer = LeaseTimer(self.ttl, now)

    def _acquire(self, p: int) -> None:
        self._give_up_overdue()
        sent = self._clock()
        try:
            with self._bounded():
                lease = self.store.acquire(self.key(p), self.owner, self.ttl)
        except StoreError as exc:
            log.warning("group %s: could not take partition %d: %s", self.label, p, describe(exc))
            return
        if lease is None:
            return  # still held by its previous owner: it releases it, or it expires
        self._leases[p] = lease
        self._timers[p] = LeaseTimer(self.ttl, sent)
        log.info("group %s: %s took partition %d (fence %d)", self.label, self.owner, p, lease.fence)
        self.on_assigned(p, lease.fence)

    def _renew(self, p: int) -> None:
        self._give_up_overdue()
        lease = self._leases.get(p)
        if lease is None:
            return  # given up just now
        sent = self._clock()
        try:
            with self._bounded():
                kept = self.store.renew(lease, self.ttl)
        except StoreError as exc:
            log.warning("group %s: could not renew partition %d: %s", self.label, p, describe(exc))
            return  # _give_up_overdue stops it if this goes on
        if kept:
            self._timers[p].renewed(sent)
        else:
            self._lose(p, "another member holds its lease")

    def _release(self, p: int, why: str) -> None:
        lease = self._leases.get(p)
        if lease is None:
            return  # given up already
        self._forget(p)
        try:
            self._revoke(p, why)
        finally:
            self._give_back(p, lease, None)

    def _revoke(self, p: int, why: str) -> None:
        if self._on_revoked_why is not None:
            self._on_revoked_why(p, why)
        else:
            self.on_revoked(p)

    def _give_back(self, p: int, lease: Lease, deadline: float | None) -> bool:
        """Release ``p``'s lease, the call bounded by ``deadline`` too; False when it was not
        released (it expires by itself; the caller says so when it skipped the call)."""
        try:
            with self._bounded(deadline):
                self.store.release(lease)
        except StoreError as exc:  # it expires by itself
            log.warning("group %s: could not release partition %d: %s", self.label, p, describe(exc))
            return False
        # the counterpart of "took partition" (a rebalance or a stop)
        log.info("group %s: %s released partition %d (fence %d)", self.label, self.owner, p, lease.fence)
        return True

    def drop(self, partition: int, why: str) -> None:
        """Give ``partition`` up without releasing its lease (a fenced write showed that another
        member took it over): ``on_revoked`` runs on the caller's thread. Nothing happens when
        it is not held."""
        with self._lock:
            if partition in self._leases:
                self._lose(partition, why)

    def _lose(self, p: int, why: str) -> None:
        self._forget(p)
        log.warning("group %s: %s gives up partition %d: %s", self.label, self.owner, p, why)
        self._revoke(p, why)

    def _forget(self, p: int) -> None:
        self._leases.pop(p, None)
        self._timers.pop(p, None)

    def _give_up_overdue(self) -> None:
        now = self._clock()
        for p in sorted(p for p, timer in self._timers.items() if timer.must_give_up(now)):
            self._lose(p, f"its lease was not renewed within {self.ttl * 2 / 3:.3g}s")

    @contextlib.contextmanager
    def _bounded(self, deadline: float | None = None) -> Iterator[None]:
        """Bound a store call by ``ttl / 6``, by the earliest give-up time of a held lease, so
        that no call can keep a partition past it (pymongo raises, the store says StoreError),
        and by ``deadline`` (this member's clock) when given."""
        now = self._clock()
        limit = self.ttl / 6 if deadline is None else min(self.ttl / 6, deadline - now)
        for timer in list(self._timers.values()):
            limit = min(limit, timer.sent_at + self.ttl * 2 / 3 - now)
        with pymongo.timeout(max(0.001, limit)):
            yield

    # -- the thread ------------------------------------------------------

    def start(self) -> None:
        """Join the group now and start the thread.

        :raises GroupMismatch: at once, when the group document has another partition count or
            mode. A store that fails or is slow (the join, like every store call, is bounded by
            ``ttl / 6``) does not make it raise: it logs a WARNING and the thread keeps trying to
            join at every poll; a mismatch found then goes to ``on_fatal``.
        """
        if self._thread is not None:
            raise RuntimeError("this GroupMember was started already")
        self.tick()
        self._thread = threading.Thread(
            target=self._run, name=f"mongo-events-group-{self.config.name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        run_guarded(self._loop, self._fatal, self._thread.name if self._thread else "group")

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.poll_interval):
                self.tick()
        except BaseException:
            self._release_all("the member stopped on an error")
            raise

    def _fatal(self, error: BaseException) -> None:
        self.error = error
        if self._on_fatal is not None:
            self._on_fatal(error)
        else:
            log.error("group %s: member %s stopped: %s", self.label, self.owner, describe(error))

    def stop(self, timeout: float = 5.0, deadline: float | None = None) -> bool:
        """Stop ticking, revoke every partition, then release their leases and the heartbeat at
        once (a clean handover: the others take over at their next poll). Returns False when the
        thread did not end within ``timeout`` (then nothing is revoked or released here).

        ``deadline`` (this member's clock) bounds the release calls as well: a lease whose release
        would start after it is not released, and a WARNING says so (it expires by itself within
        ``ttl``; the others take its partition over then).
        """
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, timeout))
            if thread.is_alive():
                return False
        self._release_all(STOPPING, deadline)
        return True

    def _release_all(self, why: str, deadline: float | None = None) -> None:
        with self._lock:
            leases = sorted(self._leases.items())
            # Revoke them all first: their callbacks and final checkpoints are done before a
            # release call (each up to ttl / 6) can eat the time of one of them.
            for p, _ in leases:
                self._forget(p)
                try:
                    self._revoke(p, why)
                except Exception:  # one failing callback must not keep the other leases
                    log.exception("group %s: revoking partition %d failed", self.label, p)
            kept: list[str] = []
            for p, lease in leases:
                if deadline is not None and self._clock() >= deadline:
                    kept.append(f"partition {p}")
                else:
                    self._give_back(p, lease, deadline)
            heartbeat, self._heartbeat, self._heartbeat_timer = self._heartbeat, None, None
            if heartbeat is not None:
                if deadline is not None and self._clock() >= deadline:
                    kept.append("the heartbeat")
                else:
                    try:
                        with self._bounded(deadline):
                            self.store.release(heartbeat)
                    except StoreError as exc:
                        log.warning(
                            "group %s: could not release the heartbeat: %s", self.label, describe(exc)
                        )
            if kept:
                log.warning(
                    "group %s: %s did not release %s: its stop had no time left; the leases expire by "
                    "themselves within %.3gs, and the other members take the partitions over then",
                    self.label,
                    self.owner,
                    ", ".join(kept),
                    self.ttl,
                )
            self._share = frozenset()
