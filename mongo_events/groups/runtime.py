"""A bus in a consumer group: one stream consumer per partition held, started and stopped by the member.

``Bus(target, group=..., partitions=K, lease_ttl=...)`` delegates here. The bus keeps its
options, subscriptions, flusher and lifecycle; this module owns what a group adds:

- a :class:`~mongo_events.groups.GroupMember` whose ``on_assigned(p, fence)`` starts a
  :class:`~mongo_events.consumer.StreamConsumer` for partition ``p`` (its checkpoint key is
  ``"<group>:<namespace>#<p>"``, its writes fenced by ``fence``) and whose ``on_revoked(p)``
  stops it within ``lease_ttl / 3``;
- one :class:`~mongo_events.dispatch.Dispatcher` per partition, all on one worker pool;
- the partition filter: a ``$match`` on ``$toHashedIndexKey`` where the server evaluates it,
  else the same hash on the client (the group document records which, and refuses a member
  with the other mode);
- a refused (fenced) write: that partition is lost, stopped, logged at WARNING; the bus runs on.

.. versionadded:: 0.2.0
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any

import attrs
import pymongo

from ..consumer import StreamConsumer
from ..dispatch import Abandoned, Dispatcher
from ..errors import ConfigurationError
from ..guard import describe, run_guarded
from ..health import Health, assess
from ..lifecycle import FINAL_FLUSH_MIN
from ..stores.mongodb import MongoResumeTokenStore
from .base import FencedOut
from .fencing import FencedResumeTokenStore, raise_fence
from .member import GroupMember, partition_key
from .mongodb import DEFAULT_LEASE_COLLECTION, MongoLeaseStore
from .partitioning import PartitionMode, event_partition, server_match_stage, server_supports_hashed_keys

if TYPE_CHECKING:
    from ..bus_options import BusOptions
    from ..consumer import Report
    from ..dispatch import DeadLetterHook
    from ..flusher import Flusher
    from ..subscription import Subscription


@attrs.frozen
class BusLink:
    """What a group runtime uses of its bus, handed over by the bus (no private reads).

    :ivar options: the bus's options for this run.
    :ivar subscriptions: the bus's subscriptions (fixed while it runs).
    :ivar dead_letters: the bus's dead-letter hook.
    :ivar fail: stops the bus with an error.
    :ivar report: tells ``on_error``.
    :ivar flusher: the bus's flusher of this run, once it exists.
    """

    options: BusOptions
    subscriptions: Sequence[Subscription]
    dead_letters: DeadLetterHook | None
    fail: Callable[[BaseException], None]
    report: Report
    flusher: Callable[[], Flusher | None]


__all__ = ["GroupRuntime", "GroupStatus"]

log = logging.getLogger(__name__)


@attrs.frozen
class GroupStatus:
    """A group member's view, in ``Bus.health().group``.

    :ivar name: the group.
    :ivar partitions: ``K``, the group's partition count.
    :ivar mode: ``"server"`` or ``"client"`` partition filtering.
    :ivar held: the partitions this member holds now, with the fence of each lease.
    :ivar members: the live members this member saw at its last poll.
    :ivar rebalances: how many times this member's share changed.
    :ivar lease_state: ``"active"`` (holds partitions), ``"standby"`` (holds none) or ``"stopped"``.

    .. versionadded:: 0.2.0
    """

    name: str
    partitions: int
    mode: str
    held: dict[int, int]
    members: int
    rebalances: int
    lease_state: str


class _Partition:
    """One held partition: its consumer, dispatcher and stop flag."""

    def __init__(self, index: int, fence: int) -> None:
        self.index = index
        self.fence = fence
        self.assigned_at = time.monotonic()
        self.stop_event = threading.Event()
        #: Set when the partition is revoked or fenced out: nothing more is delivered or written.
        self.closed = threading.Event()
        self.consumer: StreamConsumer | None = None
        self.dispatcher: Dispatcher | None = None
        #: One flush of this partition at a time (the flusher's, or the final one at revoke).
        self.flushing = threading.Lock()
        #: When it was told to stop (monotonic), and the callbacks still running when its
        #: revocation stopped waiting for them.
        self.halted_at: float | None = None
        self.abandoned: Abandoned | None = None
        #: Its running callbacks were handed to the stop already (said once, not twice).
        self.handed = False


def _fenced(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, FencedOut):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class GroupRuntime:
    """The partitions a :class:`~mongo_events.Bus` holds in its consumer group (internal to the bus).

    :param bus: what the runtime uses of its bus.
    :param group: the group's name.
    :param partitions: ``K``.
    :param lease_ttl: seconds.
    """

    def __init__(self, bus: BusLink, group: str, partitions: int, lease_ttl: float) -> None:
        store = bus.options.token_store
        if not isinstance(store, MongoResumeTokenStore):
            raise ConfigurationError(
                f"group={group!r} needs checkpoints in MongoDB (the default resume-token store, or a "
                f"MongoResumeTokenStore), where writes can be fenced; got {type(store).__name__}"
            )
        self.bus = bus
        self.group = group
        self.partitions = partitions
        self.lease_ttl = float(lease_ttl)
        self.token_store = store
        self.lease_collection = store.collection.database[DEFAULT_LEASE_COLLECTION]
        self.lease_store = MongoLeaseStore(self.lease_collection)
        self.mode: PartitionMode | None = None
        self.member: GroupMember | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._parts: dict[int, _Partition] = {}
        self._lock = threading.Lock()
        self._stopping = False
        #: At stop, every partition's wait for its callbacks ends by this time (monotonic).
        self._stop_waits_until = 0.0
        #: At stop, the final checkpoints and the releases end by this time (monotonic).
        self._stop_grace = 0.0
        #: The run's hurry (a second signal, ``Bus.hurry()``): no more waiting for callbacks.
        self._hurry: threading.Event | None = None
        #: Callbacks given up on by revocations the stop started (under ``_lock``), which
        #: ``stop()`` returns; once it returned, a late one is said at WARNING instead.
        self._stop_abandoned: list[Abandoned] = []
        self._stop_returned = False
        #: Partitions revoked for the stop and not closed yet (under ``_lock``).
        self._finishing: set[_Partition] = set()
        #: Partitions released together by a rebalance finish by this time (monotonic).
        self._release_deadline = 0.0
        #: Partitions given up because a write was refused (for tests and health).
        self.fenced_out = 0
        #: Why the bus failed, once it did (under ``_lock``): a ``start()`` under way raises it.
        self._failure: BaseException | None = None
        #: The streams ``start()`` waits for while it does (under ``_lock``).
        self._starting: list[StreamConsumer] = []

    # -- lifecycle (the bus calls these) ----------------------------------------------------

    def start(self) -> None:
        """Join the group and take this member's share now (bus ``start()``; raises what fails)."""
        bus = self.bus
        try:
            server = server_supports_hashed_keys(self.lease_collection)
        except pymongo.errors.PyMongoError as exc:
            raise ConfigurationError(
                f"bus {bus.options.name!r}: could not probe $toHashedIndexKey for group {self.group!r}: {exc}"
            ) from exc
        self.mode = PartitionMode.SERVER if server else PartitionMode.CLIENT
        # Every held partition runs max_workers loops on this pool; the extra share lets a
        # partition start while a revoked one's callbacks are still finishing.
        self._executor = ThreadPoolExecutor(
            bus.options.max_workers * (self.partitions + 1),
            thread_name_prefix=f"mongo_events.worker[{bus.options.name}]",
        )
        self.member = GroupMember(
            self.lease_store,
            self.group,
            bus.options.namespace,
            partitions=self.partitions,
            ttl=self.lease_ttl,
            mode=self.mode,
            on_assigned=self._assigned,
            on_revoked_why=self._revoked,
            on_fatal=bus.fail,
            on_rebalance=self._rebalanced,
            on_releasing=self._releasing,
        )
        # The first tick: GroupMismatch and a bad checkpoint raise here; a store too slow to
        # answer the join does not (the member joins at a later poll, on its thread).
        self.member.start()
        # Then wait for the first streams, not inside on_assigned: the member's thread must stay
        # free to renew its leases while a server is slow to open a stream. A failure of the bus
        # meanwhile (another partition's stream, the flusher, the member) ends the wait: see
        # failed_to_start().
        with self._lock:
            failure = self._failure
            starting = self._starting = [p.consumer for p in self._parts.values() if p.consumer is not None]
        if failure is not None:
            raise failure
        deadline = time.monotonic() + bus.options.start_timeout
        for consumer in starting:
            if not consumer.connected.wait(max(0.0, deadline - time.monotonic())):
                break  # the stream keeps trying in the background; health() says so meanwhile
            if consumer.connect_error is not None:
                raise consumer.connect_error
        with self._lock:
            failure, self._starting = self._failure, []
        if failure is not None:
            raise failure
        log.info(
            "bus %s: member %s of group %s (%d partitions, %s-side filtering) holds %s",
            bus.options.name,
            self.member.owner,
            self.group,
            self.partitions,
            self.mode.value,
            sorted(self.member.owned) or "nothing (standby)",
        )

    def failed_to_start(self, error: BaseException) -> None:
        """The bus failed with ``error``: a ``start()`` under way raises it now, instead of
        waiting out ``start_timeout`` for streams that its stop ends before they open."""
        with self._lock:
            if self._failure is None:
                self._failure = error
            starting = list(self._starting)
        for consumer in starting:
            consumer.failed_to_start(error)  # wakes start(), unless that stream opened already

    def stop(self, deadline: float, hurry: threading.Event | None = None) -> list[Abandoned]:
        """Stop every partition by ``deadline`` (monotonic; at most ``lease_ttl / 3`` from now),
        write their final checkpoints, then release the leases; returns the callbacks still
        running when it stopped waiting for them (the bus says so: their events are delivered
        again by the next owner).

        Half of that time is for the callbacks of all the partitions (none once ``hurry`` is
        set), the rest for the final checkpoints and the releases, which get at least
        ``FINAL_FLUSH_MIN`` after the wait (the final write of a stream bus gets as much): the
        whole stop ends by ``min(deadline, now + lease_ttl / 3) + FINAL_FLUSH_MIN``. What
        could not be written or released in time is said at WARNING.
        """
        now = time.monotonic()
        stop_deadline = min(deadline, now + self.lease_ttl / 3)
        hurried = hurry is not None and hurry.is_set()
        waits_until = now if hurried else now + (stop_deadline - now) / 2
        grace = now + FINAL_FLUSH_MIN if hurried else max(stop_deadline, waits_until + FINAL_FLUSH_MIN)
        with self._lock:
            # A revocation that reads _stopping after this hands its callbacks to this stop;
            # one that read it before says them itself (see _revoked).
            self._stop_waits_until, self._stop_grace = waits_until, grace
            self._hurry = hurry
            self._stopping = True
            parts = list(self._parts.values())
        for part in parts:  # all at once: they share the deadline
            self._halt(part)
        member = self.member
        if member is not None and not member.stop(grace - time.monotonic(), grace):
            self._gave_up_on_member(grace - now)
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # idle threads end; busy ones when their callback returns
        with self._lock:
            self._stop_returned = True
            return list(self._stop_abandoned)

    def _gave_up_on_member(self, waited: float) -> None:
        """The member's thread did not end in time (stuck in a callback or a store call): nothing
        was revoked, written or released. Close every partition not closed yet, hand its running
        callbacks to the stop, and say what was not done."""
        with self._lock:
            parts = [p for p in {*self._parts.values(), *self._finishing} if not p.closed.is_set()]
            for part in parts:
                part.closed.set()  # the gates close: nothing more is delivered or written
                part.handed = True
        for part in parts:
            self._halt(part)
            abandoned = part.dispatcher.abandoned() if part.dispatcher is not None else None
            if abandoned is not None:
                with self._lock:
                    self._stop_abandoned.append(abandoned)
        log.warning(
            "bus %s: the group member's thread did not end within %.1fs: the final checkpoints of "
            "partitions %s were not written (their next owner redelivers the events after the last "
            "stored ones), and no lease was released (they expire within lease_ttl = %.3gs, and the "
            "other members take the partitions over then)",
            self.bus.options.name,
            waited,
            sorted(p.index for p in parts) or "(none)",
            self.lease_ttl,
        )

    def flush(self) -> None:
        """The flusher task: write every held partition's acks and checkpoint (fenced)."""
        with self._lock:
            parts = [p for p in self._parts.values() if not p.closed.is_set()]
        error: Exception | None = None
        for part in parts:
            assert part.consumer is not None
            try:
                with part.flushing:
                    if not part.closed.is_set():
                        part.consumer.checkpointer.flush()
            except Exception as exc:
                if _fenced(exc):
                    self._fenced_out(part, exc)
                elif error is None:
                    error = exc
        if self.bus.options.metrics is not None:  # for the headroom gauge; reads at most every 30 s
            for part in parts:
                if part.consumer is not None:
                    part.consumer.oplog.refresh()
        if error is not None:
            raise error

    # -- the member's callbacks -----------------------------------------------------------------

    def _assigned(self, p: int, fence: int) -> None:
        bus = self.bus
        assert self.member is not None and self.mode is not None
        part = _Partition(p, fence)
        key = partition_key(self.group, bus.options.namespace, p)
        spec = bus.options.spec()
        stages: list[dict[str, Any]] = []
        if self.mode is PartitionMode.SERVER and self.partitions > 1:
            stages.append(server_match_stage(p, self.partitions))
        if bus.options.level != "collection":  # a database or cluster watch must not see our own writes
            coll, leases = self.token_store.collection, self.lease_collection
            stages.append(
                {
                    "$match": {
                        "$nor": [
                            {"ns.db": coll.database.name, "ns.coll": coll.name},
                            {"ns.db": leases.database.name, "ns.coll": leases.name},
                        ]
                    }
                }
            )
        spec = attrs.evolve(
            spec,
            name=f"{bus.options.name}#{p}",
            resume_token_key=key,
            pipeline=stages + spec.pipeline,
            group_start=self.member.config.started_at,
        )
        member = self.member
        closed = part.closed

        def gate() -> bool:
            return not closed.is_set() and member.holds(p)

        keep = None
        if self.mode is PartitionMode.CLIENT and self.partitions > 1:
            partitions = self.partitions

            def keep(raw: Mapping[str, Any]) -> bool:
                return event_partition(raw, partitions) == p

        consumer = StreamConsumer(
            spec,
            bus.subscriptions,
            token_store=FencedResumeTokenStore(self.token_store, fence),
            ack_store=bus.options.ack_store,
            dead_letters=bus.dead_letters,
            metrics=bus.options.metrics,
            stop_event=part.stop_event,
            fail=lambda exc: self._partition_failed(part, exc),
            report=bus.report,
            keep=keep,
            gate=gate,
        )
        dispatcher = Dispatcher(
            max_workers=bus.options.max_workers,
            decoder=bus.options.decoder,
            middleware=bus.options.chain,
            on_done=consumer.window.finish,
            on_fatal=bus.fail,
            dead_letters=bus.dead_letters,
            bus_name=spec.name,
            lock=consumer.window.mutex,
            executor=self._executor,
            gate=gate,
        )
        flusher = bus.flusher()
        consumer.attach(dispatcher, flusher.wake if flusher is not None else lambda: None)
        part.consumer, part.dispatcher = consumer, dispatcher
        # The previous owner's writes are refused from now on, not only after our first write.
        raise_fence(self.token_store, key, fence)
        position = consumer.initial_position()  # a StoreError is fatal: the member stops, the bus fails
        with self._lock:
            stopping = self._stopping
            if not stopping:
                self._parts[p] = part
        if stopping:  # the stop began meanwhile (its snapshot does not have it): do not start it
            part.closed.set()
            dispatcher.shutdown()
            log.info("bus %s: partition %d was taken as the bus stops: not started", bus.options.name, p)
            return
        dispatcher.start()
        consumer.start(position)

    def _revoked(self, p: int, why: str) -> None:
        with self._lock:
            part = self._parts.pop(p, None)
            # Read once, with the pop: a revocation the stop started hands its callbacks to the
            # stop (stop() returns them); any other says them itself, even if a stop begins now.
            for_stop = self._stopping
            if part is not None and for_stop:
                self._finishing.add(part)
        if part is None:
            return
        self._halt(part)
        if for_stop:
            self._finish(part, self._stop_waits_until, self._stop_grace, "the bus is stopping", for_stop=True)
            return
        # The member's thread waits for this, and renews its other leases only afterwards: a
        # revocation (or all those of one rebalance together) takes at most ttl / 6, so that a
        # renewal due meanwhile is still sent before its give-up time (renew at ttl / 3, give up
        # at ttl * 2 / 3, one poll is ttl / 12). Half of it for the watcher and callbacks.
        now = time.monotonic()
        deadline = self._release_deadline if now < self._release_deadline else now + self.lease_ttl / 6
        self._finish(part, now + (deadline - now) / 2, deadline, why, for_stop=False)

    def _releasing(self, partitions: tuple[int, ...]) -> None:
        """A rebalance releases ``partitions``: stop them all now; their revocations share one deadline."""
        self._release_deadline = time.monotonic() + self.lease_ttl / 6
        with self._lock:
            parts = [self._parts[p] for p in partitions if p in self._parts]
        for part in parts:
            self._halt(part)

    def _rebalanced(self, share: frozenset[int]) -> None:
        if self.bus.options.metrics is not None:
            self.bus.options.metrics.group_rebalanced(self.group, self.bus.options.namespace)

    # -- stopping one partition --------------------------------------------------------------------

    def _halt(self, part: _Partition) -> None:
        """Stop reading and dispatching at once (no waiting)."""
        if part.halted_at is None:
            part.halted_at = time.monotonic()
        part.stop_event.set()
        if part.consumer is not None:
            window = part.consumer.window
            with window.cond:
                window.cond.notify_all()
        if part.dispatcher is not None:
            part.dispatcher.halt()

    def _finish(
        self, part: _Partition, waits_until: float, deadline: float, why: str, *, for_stop: bool
    ) -> None:
        """Wait for the watcher and running callbacks until ``waits_until`` (or the run's hurry),
        then write the final checkpoint by ``deadline`` unless the partition was fenced out; then
        it delivers and writes nothing more.

        Callbacks still running when the wait ends are handed to the stop (``for_stop``: the bus
        raises or logs them), or said at WARNING with ``why`` the partition was given up.
        """
        consumer, dispatcher = part.consumer, part.dispatcher
        if consumer is None or dispatcher is None:
            part.closed.set()
            self._done(part)
            return
        hurry = self._hurry
        watcher = consumer.watcher
        if watcher is not None:
            hurried = hurry is not None and hurry.is_set()
            watcher.join(0.0 if hurried else max(0.0, waits_until - time.monotonic()))
        # Not dispatcher.join(): the workers' threads go back to the shared pool, they do not end.
        if not dispatcher.wait_idle(waits_until, hurry):
            part.abandoned = dispatcher.abandoned()
            if part.abandoned is not None:
                self._give_up_on(part, part.abandoned, why, for_stop)
        if not part.closed.is_set():
            self._final_write(part, consumer, deadline)
        part.closed.set()
        dispatcher.shutdown()
        self._done(part)

    def _final_write(self, part: _Partition, consumer: StreamConsumer, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0 or not part.flushing.acquire(timeout=remaining):
                log.warning(
                    "bus %s: final checkpoint of partition %d not written: its stop had no time left (a "
                    "flush still ran, or the partitions before it used the time); its next owner "
                    "redelivers the events after the last stored checkpoint",
                    self.bus.options.name,
                    part.index,
                )
                return
            try:
                with pymongo.timeout(max(0.001, deadline - time.monotonic())):
                    consumer.checkpointer.flush()
            finally:
                part.flushing.release()
        except Exception as exc:
            if _fenced(exc):
                log.warning(
                    "bus %s: final checkpoint of partition %d refused (%s)",
                    self.bus.options.name,
                    part.index,
                    exc,
                )
            else:
                log.warning(
                    "bus %s: final checkpoint of partition %d not stored (%s); its next owner redelivers "
                    "the events after the last stored one",
                    self.bus.options.name,
                    part.index,
                    describe(exc),
                )

    def _done(self, part: _Partition) -> None:
        with self._lock:
            self._finishing.discard(part)

    def _give_up_on(self, part: _Partition, abandoned: Abandoned, why: str, for_stop: bool) -> None:
        """Hand ``abandoned`` to the stop (once), or say it now."""
        with self._lock:
            handed, part.handed = part.handed, True
            to_stop = for_stop and not self._stop_returned
            if to_stop and not handed:
                self._stop_abandoned.append(abandoned)
        if handed or to_stop:
            return
        if self._hurry is not None and self._hurry.is_set():
            limit = "the stop was hurried: a second signal, or hurry()"
        elif for_stop:  # after stop() returned
            limit = (
                f"a member's stop waits at most lease_ttl / 3 = {self.lease_ttl / 3:.2f}s, half of it for "
                "callbacks, and its stop had returned already"
            )
        else:
            limit = (
                f"a revocation waits at most lease_ttl / 6 = {self.lease_ttl / 6:.2f}s (those of one "
                "rebalance together), half of it for callbacks, so that the member renews its other "
                "leases in time"
            )
        self._say_abandoned(part, abandoned, why, limit)

    def _say_abandoned(self, part: _Partition, abandoned: Abandoned, why: str, limit: str) -> None:
        """A partition was given up with callbacks still running: say what that means."""
        halted = part.halted_at if part.halted_at is not None else abandoned.at
        log.warning(
            "bus %s: partition %d of group %s was given up (%s) while %d callback(s) still ran; it "
            "waited %.2fs for them (%s): %s. Their events were not checkpointed: the partition's next "
            "owner delivers them again, possibly while they still run here, so two members may handle "
            "the same document at once",
            self.bus.options.name,
            part.index,
            self.group,
            why,
            len(abandoned.running),
            max(0.0, abandoned.at - halted),
            limit,
            "; ".join(abandoned.running),
        )

    def _fenced_out(self, part: _Partition, exc: BaseException) -> None:
        """A write of ``part`` was refused: another member owns it now. Stop it; the bus runs on."""
        if part.closed.is_set():
            return
        part.closed.set()  # the gates close now: nothing more is delivered or written
        self.fenced_out += 1
        log.warning(
            "bus %s: partition %d of group %s was taken over by another member (fence %d refused: %s); "
            "stopping it here without writing or delivering more",
            self.bus.options.name,
            part.index,
            self.group,
            part.fence,
            exc,
        )
        member = self.member
        if member is not None:
            # Not on this thread (the flusher, or a watcher): revoking waits for them.
            name = f"mongo_events.group-drop[{self.bus.options.name}#{part.index}]"
            threading.Thread(
                target=run_guarded,
                args=(lambda: member.drop(part.index, "a fenced write was refused"), self.bus.fail, name),
                name=name,
                daemon=True,
            ).start()

    def _partition_failed(self, part: _Partition, exc: BaseException) -> None:
        if _fenced(exc):
            self._fenced_out(part, exc)
        elif not part.closed.is_set():
            self.bus.fail(exc)
        else:  # the partition was given up already: its owner now redelivers; say what broke
            log.warning(
                "bus %s: partition %d, already given up, failed while stopping: %s",
                self.bus.options.name,
                part.index,
                describe(exc),
            )

    # -- queries -----------------------------------------------------------------------------------

    def consumers(self) -> list[StreamConsumer]:
        """The stream consumers of the partitions held now."""
        with self._lock:
            return [p.consumer for p in self._parts.values() if p.consumer is not None]

    def status(self) -> GroupStatus:
        member = self.member
        held = member.owned if member is not None else {}
        state = "stopped" if member is None or self._stopping else "active" if held else "standby"
        return GroupStatus(
            name=self.group,
            partitions=self.partitions,
            mode=self.mode.value if self.mode is not None else "unknown",
            held=held,
            members=len(member.members) if member is not None else 0,
            rebalances=member.rebalances if member is not None else 0,
            lease_state=state,
        )

    def pending(self) -> int:
        return sum(c.window.pending() for c in self.consumers())

    def in_flight(self) -> int:
        return sum(c.window.size() for c in self.consumers())

    def checkpoint_age(self) -> float | None:
        ages = [a for a in (c.checkpoint_age() for c in self.consumers()) if a is not None]
        return max(ages) if ages else None

    def oplog_headroom(self) -> float | None:
        rooms = [h for h in (c.oplog_headroom() for c in self.consumers()) if h is not None]
        return min(rooms) if rooms else None

    def join(self, deadline: float | None, stopped: Callable[[], bool]) -> bool:
        """Wait until every event each held partition received so far is done (True); False
        when ``deadline`` (monotonic) passes or the bus stops first.

        A partition revoked meanwhile (a rebalance, not the stop) counts as done once it is
        closed: this member delivers nothing more of it, and its next owner delivers again
        what was not finished here.
        """
        with self._lock:
            held = [(p.consumer.window, p.closed) for p in self._parts.values() if p.consumer is not None]
        for window, closed in held:
            # A revocation halts the partition's workers: the events still queued never finish
            # here, so without the closed check this would wait until the deadline, or for ever.
            def given_up(closed: threading.Event = closed) -> bool:
                return stopped() or closed.is_set()

            with window.cond:
                if window.wait_for_done(window.tracker.last_seq, deadline, given_up):
                    continue
            with self._lock:
                revoked = closed.is_set() and not self._stopping
            if not revoked or stopped():
                return False
        return True

    def health(self, state: str, running: bool, failure: BaseException | None) -> Health:
        """The bus's health: its partitions' streams together, plus :class:`GroupStatus`."""
        with self._lock:
            parts = [p for p in self._parts.values() if p.consumer is not None]
        consumers = [p.consumer for p in parts if p.consumer is not None]
        # A partition just taken over gets start_timeout to open its stream before it counts as
        # never opened (unhealthy): a rebalance must not fail a liveness probe.
        young = time.monotonic() - self.bus.options.start_timeout
        events = [c.last_event for c in consumers if c.last_event is not None]
        errors: list[tuple[str, datetime]] = [c.last_error for c in consumers if c.last_error is not None]
        health = assess(
            state=state,
            running=running,
            opened=all(p.consumer.opened or p.assigned_at > young for p in parts if p.consumer is not None),
            stream_active=all(c.stream_active for c in consumers),  # a standby holds none: healthy
            namespace=self.bus.options.namespace,
            last_event=max(events, key=lambda e: e[0]) if events else None,
            last_error=max(errors, key=lambda e: e[1]) if errors else None,
            failure=failure,
            checkpoint_age=self.checkpoint_age(),
            oplog_headroom=self.oplog_headroom(),
            pending=sum(c.window.pending() for c in consumers),
            in_flight=sum(c.window.size() for c in consumers),
            reconnections=sum(c.reconnections for c in consumers),
        )
        return attrs.evolve(health, group=self.status())
