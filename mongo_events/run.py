"""One run of a bus, from ``start()`` to the end of its stop: the parts it started and the queries on them.

A :class:`~mongo_events.Bus` makes a new run at construction and at each ``start()``:
:class:`StreamRun` (one :class:`~mongo_events.consumer.StreamConsumer`, its dispatcher and
flusher) or, with ``group=``, :class:`GroupRun` (a :class:`~mongo_events.groups.runtime.GroupRuntime`
and the flusher of its partitions). Both answer the one interface of :class:`BusRun`, so
the bus delegates each query in one line. The run owns its stop events and the shutdown
sequence; the bus keeps its state machine and hands the run what it needs in a
:class:`RunLink` (no private reads, no import of ``bus.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import attrs

from .bus_options import BusOptions
from .consumer import Report, StreamConsumer
from .dispatch import Abandoned, DeadLetterHook, Dispatcher
from .errors import StoreError
from .flusher import Flusher
from .groups.collision import StampedResumeTokenStore
from .groups.runtime import BusLink, GroupRuntime
from .guard import describe
from .health import Health, stream_health
from .idempotency.base import IdempotencyStore
from .lifecycle import (
    FINAL_FLUSH_MIN,
    Store,
    build_group_flusher,
    build_threads,
    close_stores,
    ensure_indexes,
    stop_threads,
    wait_for_stream,
)
from .stores.base import ResumeTokenStore
from .stores.mongodb import MongoResumeTokenStore
from .subscription import Subscription
from .watcher import Position

__all__ = ["BusRun", "GroupRun", "RunLink", "StreamRun", "Unfinished", "new_run"]

#: The bus's own log lines (they moved here from bus.py): they keep its logger.
log = logging.getLogger("mongo_events.bus")


def _nothing() -> None:
    return None


@attrs.frozen
class RunLink:
    """What a run uses of its bus, handed over by the bus.

    :ivar options: the bus's options.
    :ivar subscriptions: the bus's subscriptions (fixed while it runs).
    :ivar dead_letters: the bus's dead-letter hook.
    :ivar fail: stops the bus with an error.
    :ivar report: tells ``on_error``.
    :ivar position: where a single stream starts (the bus's seam for the benchmark).
    :ivar observe: attaches metrics to the bus (called as the threads start).
    :ivar unobserve: detaches them (at stop).
    :ivar publish: attaches the status publisher.
    """

    options: BusOptions
    subscriptions: Sequence[Subscription]
    dead_letters: DeadLetterHook | None
    fail: Callable[[BaseException], None]
    report: Report
    position: Callable[[], Position]
    observe: Callable[[], None] = _nothing
    unobserve: Callable[[], None] = _nothing
    publish: Callable[[], None] = _nothing


@attrs.frozen
class Unfinished:
    """The callbacks a stop stopped waiting for, and what to say about them.

    :ivar running: each callback (subscription, event id, thread).
    :ivar waited: seconds from the start of the stop until it stopped waiting for them.
    :ivar message: how many, which, how long and why no longer, and what follows for their events.
    """

    running: tuple[str, ...]
    waited: float
    message: str


class BusRun:
    """The parts of one run and the queries on them; see :class:`StreamRun` and :class:`GroupRun`.

    :ivar consumer: the bus's own stream consumer (with a group: idle, its counters stay zero).
    :ivar stop_event: set when the run stops reading.
    :ivar stopped: set when the run's shutdown finished.
    :ivar hurry: set by a second signal (``Bus.hurry()``): stop without waiting for callbacks.
    """

    def __init__(self, link: RunLink, token_store: ResumeTokenStore | None) -> None:
        self.link = link
        self.stop_event = threading.Event()
        self.stopped = threading.Event()
        self.hurry = threading.Event()
        self.dispatcher: Dispatcher | None = None
        self.flusher: Flusher | None = None
        self._shutdown_lock = threading.Lock()
        o = link.options
        self.consumer = StreamConsumer(
            o.spec(),
            link.subscriptions,
            token_store=token_store,
            ack_store=o.ack_store,
            dead_letters=link.dead_letters,
            metrics=o.metrics,
            stop_event=self.stop_event,
            fail=link.fail,
            report=link.report,
        )

    # -- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        """Create the stores' indexes, then start the parts (raises what fails)."""
        ensure_indexes(
            [*self.stores(), *self._idempotency_stores()],
            lambda exc, what: self.link.report(exc, "store", what=what),
        )
        self._start()

    def _start(self) -> None:
        raise NotImplementedError

    def interrupt(self, error: BaseException, shutdown: Callable[[], None]) -> None:
        """Stop reading because the bus failed with ``error`` (a waiting ``start()`` raises it),
        and run ``shutdown()`` in a stopper thread."""
        self.consumer.failed_to_start(error)
        self.stop_event.set()
        self.wake()
        name = self.link.options.name

        def stop_after_failure() -> None:
            try:
                shutdown()
            except BaseException as exc:  # the bus is FAILED already (see Bus._shutdown); say what else broke
                log.error(
                    "bus %s: stopping after the failure also failed: %s", name, describe(exc), exc_info=exc
                )

        threading.Thread(target=stop_after_failure, name=f"mongo_events.stopper[{name}]", daemon=True).start()

    def wake(self) -> None:
        """Wake whoever waits on the window (the watcher for room, ``join()``)."""
        window = self.consumer.window
        with window.cond:
            window.cond.notify_all()

    def shutdown(
        self, timeout: float, stopping: Callable[[], None], finished: Callable[[float], str]
    ) -> Unfinished | None:
        """Stop every thread and write the final checkpoint, within ``timeout`` (plus at most
        ``FINAL_FLUSH_MIN`` for the final write when the callbacks used the whole timeout).

        ``stopping()`` is called as the sequence begins, ``finished(deadline)`` when it ends (it
        sets the bus's final state and returns its name). Returns the callbacks still running when
        it stopped waiting for them, for the bus to raise or log; ``None`` when there were none, or
        when another shutdown was under way or done (that one says it).
        """
        name = self.link.options.name
        if not self._shutdown_lock.acquire(blocking=False):
            # Another shutdown is under way (the stopper thread after a failure, or a concurrent
            # stop()): wait for it within this call's own bound, not for the whole of its run.
            if not self.stopped.wait(timeout + FINAL_FLUSH_MIN):
                log.warning(
                    "bus %s: the shutdown already under way did not finish within %.1fs; stop() returns",
                    name,
                    timeout + FINAL_FLUSH_MIN,
                )
            return None
        try:
            if self.stopped.is_set():
                return None
            stopping()
            started = time.monotonic()
            deadline = started + timeout
            try:
                abandoned = self.stop_threads(deadline)
            finally:
                state = finished(deadline)
                self.stopped.set()
                self.wake()
            self._log_stopped(state)
            return self._unfinished(abandoned, started, timeout) if abandoned else None
        finally:
            self._shutdown_lock.release()

    def _unfinished(self, abandoned: Sequence[Abandoned], started: float, timeout: float) -> Unfinished:
        running = tuple(r for a in abandoned for r in a.running)
        waited = max(0.0, max(a.at for a in abandoned) - started)
        count = len(running)
        message = (
            f"{count} callback{'s' if count != 1 else ''} {'were' if count != 1 else 'was'} still running "
            f"when the stop gave up waiting for them after {waited:.1f}s ({self.wait_limit(timeout)}): "
            f"{'; '.join(running)}. Their events were not checkpointed: {self.redelivery()}"
        )
        return Unfinished(running, waited, message)

    def wait_limit(self, timeout: float) -> str:
        """Why a stop with ``timeout`` waited no longer for callbacks."""
        if self.hurry.is_set():
            return "the stop was hurried: a second signal, or hurry()"
        return f"the stop's timeout was {timeout:.1f}s"

    def redelivery(self) -> str:
        """What happens to the events of callbacks a stop gave up on."""
        return (
            "they will be delivered again after the next start, possibly while these callbacks still "
            "run (a running callback cannot be interrupted: it ends when it returns or the process exits)"
        )

    def stop_threads(self, deadline: float) -> list[Abandoned]:
        """The shutdown steps (see :func:`~mongo_events.lifecycle.stop_threads`), then metrics and
        the stores; returns the callbacks still running when it stopped waiting for them."""
        self.stop_event.set()
        abandoned = self._stop_parts(deadline)
        last = stop_threads(
            self.link.options.name,
            self.consumer,
            self.dispatcher,
            self.flusher,
            stop_event=self.stop_event,
            deadline=deadline,
            hurry=self.hurry,
        )
        if last is not None:
            abandoned.append(last)
        if self.link.options.metrics is not None:
            try:
                self.link.unobserve()
            except Exception:
                log.exception("bus %s: detaching metrics failed", self.link.options.name)
        close_stores(self.stores())
        return abandoned

    def _stop_parts(self, deadline: float) -> list[Abandoned]:
        return []

    def _log_stopped(self, state: str) -> None:
        log.info("bus %s %s; checkpoint %s", self.link.options.name, state, self.consumer.window.checkpoint())

    def stores(self) -> list[Store | None]:
        """The stores a start opens (indexes) and a stop closes."""
        o = self.link.options
        monitor = o.monitor.store if o.monitor else None
        return [o.token_store, o.ack_store, o.dead_letter_store, monitor]

    def _idempotency_stores(self) -> list[IdempotencyStore]:
        """Each distinct idempotency store the subscriptions use (their indexes are made at start)."""
        stores: list[IdempotencyStore] = []
        for sub in self.link.subscriptions:
            if sub.idempotency is not None and all(s is not sub.idempotency.store for s in stores):
                stores.append(sub.idempotency.store)
        return stores

    # -- queries -----------------------------------------------------------------------------

    def pending(self) -> int:
        """Events received and not finished yet."""
        return self.consumer.window.pending()

    def in_flight(self) -> int:
        """Events held after the checkpoint, finished or not."""
        return self.consumer.window.size()

    def checkpoint_age(self) -> float | None:
        return self.consumer.checkpoint_age()

    def oplog_headroom(self) -> float | None:
        return self.consumer.oplog_headroom()

    def join(self, deadline: float | None, stopped: Callable[[], bool]) -> bool:
        """Wait until every event received so far is done; False on timeout or when ``stopped()``."""
        window = self.consumer.window
        with window.cond:
            return window.wait_for_done(window.tracker.last_seq, deadline, stopped)

    def health(self, state: str, running: bool, failure: BaseException | None, stalled: str | None) -> Health:
        o = self.link.options
        return stream_health(
            self.consumer,
            name=o.name,
            state=state,
            running=running,
            namespace=o.namespace,
            failure=failure,
            stalled=stalled,
            refresh_oplog=o.metrics is None,
        )


class StreamRun(BusRun):
    """A run of one change stream: the bus's stream consumer, its dispatcher and its flusher."""

    def __init__(self, link: RunLink) -> None:
        super().__init__(link, _stamped(link.options.token_store, link.options.name))

    def _start(self) -> None:
        link, consumer = self.link, self.consumer
        self.dispatcher, self.flusher = build_threads(
            link.options, consumer, dead_letters=link.dead_letters, fail=link.fail, report=link.report
        )
        try:
            position = link.position()
        except StoreError as exc:
            link.report(exc, "store", what="read checkpoint")
            raise
        link.observe()
        self.dispatcher.start()
        self.flusher.start()
        link.publish()
        consumer.start(position)
        wait_for_stream(consumer, link.options.name, link.options.namespace, link.options.start_timeout)


class GroupRun(BusRun):
    """A run as a consumer-group member: a stream consumer per partition held (see
    :mod:`mongo_events.groups.runtime`) and one flusher for them all."""

    def __init__(self, link: RunLink, group: str, partitions: int, lease_ttl: float) -> None:
        super().__init__(link, link.options.token_store)
        bus = BusLink(
            link.options, link.subscriptions, link.dead_letters, link.fail, link.report, lambda: self.flusher
        )
        self.group = GroupRuntime(bus, group, partitions, lease_ttl)

    def _start(self) -> None:
        link = self.link
        self.flusher = build_group_flusher(link.options, self.group.flush, fail=link.fail, report=link.report)
        link.observe()
        self.flusher.start()
        self.group.start()
        link.publish()  # after the first share: its first status names the partitions

    def interrupt(self, error: BaseException, shutdown: Callable[[], None]) -> None:
        # start() waits for the partitions' streams, not for the run's own (idle) consumer.
        self.group.failed_to_start(error)
        super().interrupt(error, shutdown)

    def _stop_parts(self, deadline: float) -> list[Abandoned]:
        # A group member stops its partitions (bounded by lease_ttl / 3) and releases their leases;
        # the run's hurry (a second signal, Bus.hurry()) ends its wait for callbacks too.
        return self.group.stop(deadline, self.hurry)

    def wait_limit(self, timeout: float) -> str:
        cap = self.group.lease_ttl / 3
        if self.hurry.is_set():
            return super().wait_limit(timeout)
        if cap >= timeout:
            return (
                f"a consumer-group member waits for callbacks half of the stop's timeout of {timeout:.1f}s, "
                "and uses the rest for the final checkpoints and releasing its leases"
            )
        return (
            f"a consumer-group member waits at most lease_ttl / 3 = {cap:.1f}s, half of it for callbacks "
            "and the rest for the final checkpoints, so that it releases its leases before they could "
            f"expire and the other members take over at once; the stop's own timeout was {timeout:.1f}s"
        )

    def redelivery(self) -> str:
        return (
            "whoever holds their partitions next (another member now, or this one at its next start) "
            "delivers them again, possibly while these callbacks still run here, so two members may "
            "handle the same document at once"
        )

    def _log_stopped(self, state: str) -> None:  # each partition wrote its own checkpoint
        log.info("bus %s %s; its partitions' leases are released", self.link.options.name, state)

    def pending(self) -> int:
        return self.group.pending()

    def in_flight(self) -> int:
        return self.group.in_flight()

    def checkpoint_age(self) -> float | None:
        return self.group.checkpoint_age()

    def oplog_headroom(self) -> float | None:
        return self.group.oplog_headroom()

    def join(self, deadline: float | None, stopped: Callable[[], bool]) -> bool:
        return self.group.join(deadline, stopped) and super().join(deadline, stopped)

    def health(self, state: str, running: bool, failure: BaseException | None, stalled: str | None) -> Health:
        return self.group.health(state, running, failure)


def new_run(link: RunLink) -> BusRun:
    """The run the bus's options ask for: a group member's, or one stream's."""
    o = link.options
    if o.group is None:
        return StreamRun(link)
    return GroupRun(link, o.group, o.partitions, o.lease_ttl)


def _stamped(store: ResumeTokenStore | None, bus: str) -> ResumeTokenStore | None:
    """Without a group, the default MongoDB store stamps its writes to notice a second live writer."""
    if type(store) is MongoResumeTokenStore:
        return StampedResumeTokenStore(store, bus)
    return store
