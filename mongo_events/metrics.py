"""OpenTelemetry metrics: the seed's instruments, plus checkpoint age and oplog headroom.

Only the OpenTelemetry *API* is used (the ``otel`` extra), imported when a
:class:`Metrics` is created: the library never creates SDK providers, readers
or threads. Set up the SDK in your application (after the server forks, under
gunicorn) and pass a :class:`Metrics` to each bus.

Every recording is guarded: a broken instrument, provider or exporter is
logged once and never stops event handling.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import Any, Protocol

from .delivery import Delivery
from .errors import ConfigurationError, Duplicate, Skip
from .middleware.base import Middleware

__all__ = ["Metrics", "LAG_BUCKETS", "DURATION_BUCKETS", "Observed"]

log = logging.getLogger(__name__)

#: Explicit histogram buckets (seconds) of the lag histograms, as in the seed.
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Explicit histogram buckets (seconds) of ``mongodb.handler.duration``, as in the seed.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_NAMESPACE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


def _seconds_since(wall: datetime | None, cluster_time: Any) -> float | None:
    """Seconds from an event's wall time (or, failing that, its cluster time) to now, >= 0."""
    if wall is not None:
        if wall.tzinfo is None:
            wall = wall.replace(tzinfo=timezone.utc)
        return max(0.0, time.time() - wall.timestamp())
    seconds = getattr(cluster_time, "time", None)
    if isinstance(seconds, int) and seconds > 0:
        return max(0.0, time.time() - seconds)
    return None


class Observed(Protocol):
    """What the observable gauges read from an attached stream (a :class:`~mongo_events.Bus`).

    Metrics depends on this shape only, not on the bus module.
    """

    @property
    def namespace(self) -> str: ...

    def pending_count(self) -> int: ...

    def checkpoint_age(self) -> float | None: ...

    def oplog_headroom(self) -> float | None: ...


class Metrics(Middleware):
    """OpenTelemetry instruments for one or more buses (pass as ``Bus(metrics=...)``).

    ============================== ========================== =========================================
    instrument                     kind, unit                 attributes
    ============================== ========================== =========================================
    ``mongodb.changes.processed``  counter ``{event}``        ``event``, ``operation``, ``namespace``
    ``mongodb.changes.failed``     counter ``{event}``        same (each failed attempt)
    ``mongodb.changes.retries``    counter ``{event}``        same (each retry scheduled)
    ``mongodb.changes.dead_lettered`` counter ``{event}``     same (dead-lettered or skipped)
    ``mongodb.changes.duplicates`` counter ``{event}``        same (skipped: idempotency key completed)
    ``mongodb.changes.skipped``    counter ``{event}``        same (a middleware raised ``Skip``)
    ``mongodb.events.coalesced``   counter ``{event}``        same (replaced by a newer event of its
                                                              document, ``Bus(coalesce=True)``)
    ``mongodb.oplog.lag``          histogram ``s``            ``event``, ``namespace``
    ``mongodb.handler.duration``   histogram ``s``            ``event``, ``operation``, ``namespace``
    ``mongodb.changes.pending``    observable gauge           ``namespace`` (this process's unfinished events)
    ``mongodb.stream.active``      up-down counter            ``namespace``
    ``mongodb.stream.reconnections`` counter                  ``namespace``, ``reason``
    ``mongodb.stream.receive_lag`` histogram ``s``            ``namespace``
    ``mongodb.checkpoint.age``     observable gauge ``s``     ``namespace``
    ``mongodb.oplog.headroom``     observable gauge ``s``     ``namespace`` (absent when unreadable)
    ``mongodb.group.partitions_owned`` observable gauge       ``namespace``, ``group`` (partitions this process holds)
    ``mongodb.group.rebalances``   counter ``{rebalance}``    ``namespace``, ``group`` (this member's share changed)
    ``dlq.messages``               counter ``{message}``      ``event`` (dead letters stored)
    ``dlq.messages.replayed``      counter ``{message}``      ``event`` (replays that succeeded)
    ``dlq.replay.failure``         counter ``{message}``      ``event`` (replays that failed)
    ``dlq.messages.quarantined``   counter ``{message}``      ``event``, ``reason``
    ============================== ========================== =========================================

    Handler metrics carry the event's own namespace (``db.coll``); stream metrics carry
    the watched one (``db.coll``, ``db.*`` or ``*.*``). ``event`` is the subscription name.

    :param meter_provider: an OpenTelemetry ``MeterProvider`` (default: the global one).
    :param namespace: prefixes every name (``orders`` gives ``orders.mongodb.changes.processed``,
        which Prometheus exports as ``orders_mongodb_changes_processed_total``).
    :param pending: ``fn() -> int`` that ``mongodb.changes.pending`` reports instead of
        each bus's unfinished events (Go's ``SetPendingCallback``), for example the ack
        store's count across every instance:
        ``pending=lambda: acks.count(AckFilter(status=AckStatus.PENDING))``. Reported
        without attributes; ``None`` from it reports nothing this time.
    :raises ConfigurationError: when ``opentelemetry-api`` is missing or the namespace is invalid.

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.1.0
       ``pending=``, :meth:`close` and the ``dlq.*`` instruments.
    """

    def __init__(
        self,
        meter_provider: Any = None,
        namespace: str | None = None,
        pending: Callable[[], int | None] | None = None,
    ) -> None:
        try:
            from opentelemetry import metrics as otel_metrics
        except ImportError as exc:  # pragma: no cover - the test extra installs it
            raise ConfigurationError(
                "Metrics needs the OpenTelemetry API: pip install 'mongo-events[otel]'"
            ) from exc
        if namespace is not None and not _NAMESPACE_RE.match(namespace):
            raise ConfigurationError(
                f"metrics namespace must be a letter then letters, digits or _, got {namespace!r}"
            )
        from . import __version__

        self.namespace = namespace
        provider = meter_provider if meter_provider is not None else otel_metrics.get_meter_provider()
        self._meter = provider.get_meter("mongo_events", __version__)
        self._observation = otel_metrics.Observation
        self._buses: list[Observed] = []
        self._buses_lock = threading.Lock()
        self._warned: set[str] = set()
        if pending is not None and not callable(pending):
            raise ConfigurationError(
                f"pending must be a function returning a count, got {type(pending).__name__}"
            )
        self.pending = pending
        self._closed = False
        name = self._name
        m = self._meter
        self.processed = m.create_counter(
            name("mongodb.changes.processed"), unit="{event}", description="Change events a callback handled"
        )
        self.failed = m.create_counter(
            name("mongodb.changes.failed"), unit="{event}", description="Callback attempts that raised"
        )
        self.retries = m.create_counter(
            name("mongodb.changes.retries"),
            unit="{event}",
            description="Retries scheduled after a failed attempt",
        )
        self.dead_lettered = m.create_counter(
            name("mongodb.changes.dead_lettered"),
            unit="{event}",
            description="Events given up on (dead-lettered or skipped)",
        )
        self.duplicates = m.create_counter(
            name("mongodb.changes.duplicates"),
            unit="{event}",
            description="Deliveries skipped as duplicates of processed events",
        )
        self.skipped = m.create_counter(
            name("mongodb.changes.skipped"), unit="{event}", description="Deliveries a middleware skipped"
        )
        self.coalesced = m.create_counter(
            name("mongodb.events.coalesced"),
            unit="{event}",
            description="Events not delivered because a newer event of their document replaced them",
        )
        self.oplog_lag = self._histogram(
            name("mongodb.oplog.lag"),
            "Time from the change's cluster time to its callback starting",
            LAG_BUCKETS,
        )
        self.handler_duration = self._histogram(
            name("mongodb.handler.duration"), "Callback duration", DURATION_BUCKETS
        )
        self.receive_lag = self._histogram(
            name("mongodb.stream.receive_lag"),
            "Time from the change's cluster time to the bus receiving it",
            LAG_BUCKETS,
        )
        self.stream_active = m.create_up_down_counter(
            name("mongodb.stream.active"), unit="{stream}", description="Open change streams"
        )
        self.reconnections = m.create_counter(
            name("mongodb.stream.reconnections"), unit="{reconnection}", description="Change streams reopened"
        )
        m.create_observable_gauge(
            name("mongodb.changes.pending"),
            [self._observe_pending],
            unit="{event}",
            description="Events received and not yet done",
        )
        m.create_observable_gauge(
            name("mongodb.checkpoint.age"),
            [self._observe_checkpoint_age],
            unit="s",
            description="Now minus the cluster time of the stored checkpoint",
        )
        m.create_observable_gauge(
            name("mongodb.oplog.headroom"),
            [self._observe_headroom],
            unit="s",
            description="Seconds of oplog between its oldest entry and the stored checkpoint",
        )
        # Consumer groups (Bus(group=...)).
        m.create_observable_gauge(
            name("mongodb.group.partitions_owned"),
            [self._observe_partitions_owned],
            unit="{partition}",
            description="Partitions of a consumer group this process holds",
        )
        self.group_rebalances = m.create_counter(
            name("mongodb.group.rebalances"),
            unit="{rebalance}",
            description="Times a consumer-group member's share of the partitions changed",
        )
        # The dead-letter counters of the Go event-dlq manager (dlq_messages_total, ...).
        self.dlq_stored = m.create_counter(
            name("dlq.messages"), unit="{message}", description="Dead letters stored"
        )
        self.dlq_replayed = m.create_counter(
            name("dlq.messages.replayed"), unit="{message}", description="Dead letters replayed successfully"
        )
        self.dlq_replay_failures = m.create_counter(
            name("dlq.replay.failure"), unit="{message}", description="Dead-letter replays that failed"
        )
        self.dlq_quarantined = m.create_counter(
            name("dlq.messages.quarantined"), unit="{message}", description="Dead letters quarantined"
        )
        self._snapshot_instruments()

    def _name(self, base: str) -> str:
        return f"{self.namespace}.{base}" if self.namespace else base

    def _histogram(self, name: str, description: str, buckets: tuple[float, ...]) -> Any:
        try:
            return self._meter.create_histogram(
                name, unit="s", description=description, explicit_bucket_boundaries_advisory=list(buckets)
            )
        except TypeError:  # opentelemetry-api < 1.23 has no bucket advice
            return self._meter.create_histogram(name, unit="s", description=description)

    def _broken(self, what: str, exc: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(
                "metrics: recording %s failed (%r); event handling goes on, further failures are not logged",
                what,
                exc,
            )

    # -- the bus attaches itself; observable gauges read from attached buses ---------------------

    def attach(self, bus: Observed) -> None:
        """Called by the bus at start: its gauges are reported until :meth:`detach`."""
        with self._buses_lock:
            if bus not in self._buses and not self._closed:
                self._buses.append(bus)

    def detach(self, bus: Observed) -> None:
        with self._buses_lock:
            if bus in self._buses:
                self._buses.remove(bus)

    def close(self) -> None:
        """Stop reporting the observable gauges (pending, checkpoint age, headroom); Go's ``Close()``.

        The OpenTelemetry Python API cannot unregister an instrument's callback, so
        after ``close()`` every callback reports nothing, ``pending`` is no longer
        called, and buses no longer attach. Counters and histograms still record.
        """
        with self._buses_lock:
            self._closed = True
            self._buses.clear()
            self.pending = None

    def _observe(self, what: str, read: Callable[[Observed], float | None]) -> Iterator[Any]:
        with self._buses_lock:
            buses = list(self._buses)
        for bus in buses:
            try:
                value = read(bus)
            except Exception as exc:
                self._broken(what, exc)
                continue
            if value is not None:
                yield self._observation(value, {"namespace": bus.namespace})

    def _observe_pending(self, options: Any = None) -> Iterable[Any]:
        pending = self.pending
        if pending is None:
            return list(self._observe("mongodb.changes.pending", lambda b: b.pending_count()))
        try:
            value = pending()
        except Exception as exc:
            self._broken("mongodb.changes.pending (the pending callable)", exc)
            return []
        return [] if value is None else [self._observation(value, {})]

    def _observe_checkpoint_age(self, options: Any = None) -> Iterable[Any]:
        return list(self._observe("mongodb.checkpoint.age", lambda b: b.checkpoint_age()))

    def _observe_headroom(self, options: Any = None) -> Iterable[Any]:
        return list(self._observe("mongodb.oplog.headroom", lambda b: b.oplog_headroom()))

    # -- the initial snapshot (Bus(snapshot=...)): progress and phase, from each bus's health() ------

    def _snapshot_instruments(self) -> None:
        """``mongodb.snapshot.documents`` and ``mongodb.snapshot.total`` (observable gauges
        ``{document}``, ``namespace``): documents the snapshot read in this run and the estimated
        documents it had to read (``estimated_document_count``), reported while a bus ran a
        snapshot in this run. ``mongodb.stream.phase`` (observable gauge, ``namespace`` and
        ``phase``): 1 for the bus's phase (``snapshot`` or ``streaming``), 0 for the other.
        """
        name, m = self._name, self._meter
        m.create_observable_gauge(
            name("mongodb.snapshot.documents"),
            [self._observe_snapshot_documents],
            unit="{document}",
            description="Documents the initial snapshot read in this run",
        )
        m.create_observable_gauge(
            name("mongodb.snapshot.total"),
            [self._observe_snapshot_total],
            unit="{document}",
            description="Documents the initial snapshot had to read (estimated)",
        )
        m.create_observable_gauge(
            name("mongodb.stream.phase"),
            [self._observe_phase],
            unit="{stream}",
            description="1 for the phase a bus is in (snapshot or streaming), 0 for the other",
        )

    @staticmethod
    def _health(bus: Observed) -> Any:
        health = getattr(bus, "health", None)  # a Bus has it; Observed does not ask for it
        return health() if callable(health) else None

    def _observe_snapshot_documents(self, options: Any = None) -> Iterable[Any]:
        return list(
            self._observe(
                "mongodb.snapshot.documents", lambda b: getattr(self._health(b), "snapshot_read", None)
            )
        )

    def _observe_snapshot_total(self, options: Any = None) -> Iterable[Any]:
        return list(
            self._observe(
                "mongodb.snapshot.total", lambda b: getattr(self._health(b), "snapshot_total", None)
            )
        )

    def _observe_phase(self, options: Any = None) -> Iterable[Any]:
        def in_snapshot(bus: Observed) -> float:
            return 1.0 if getattr(self._health(bus), "phase", "streaming") == "snapshot" else 0.0

        out = []
        for seen in self._observe("mongodb.stream.phase", in_snapshot):
            out.append(self._observation(seen.value, {**seen.attributes, "phase": "snapshot"}))
            out.append(self._observation(1.0 - seen.value, {**seen.attributes, "phase": "streaming"}))
        return out

    def _observe_partitions_owned(self, options: Any = None) -> Iterable[Any]:
        with self._buses_lock:
            buses = list(self._buses)
        owned: dict[tuple[str, str], int] = {}  # summed: the buses of one group in this process
        for bus in buses:
            try:
                status = getattr(self._health(bus), "group", None)  # a Bus's health() says its group
            except Exception as exc:
                self._broken("mongodb.group.partitions_owned", exc)
                continue
            if status is None:
                continue
            key = (bus.namespace, status.name)
            owned[key] = owned.get(key, 0) + len(status.held)
        return [self._observation(n, {"namespace": ns, "group": g}) for (ns, g), n in owned.items()]

    def group_rebalanced(self, group: str, namespace: str) -> None:
        """A consumer-group member's share of the partitions changed."""
        self._count(
            self.group_rebalances, "mongodb.group.rebalances", {"namespace": namespace, "group": group}
        )

    # -- stream events (called by the bus's watcher thread) ------------------------------------------

    def stream_opened(self, namespace: str) -> None:
        try:
            self.stream_active.add(1, {"namespace": namespace})
        except Exception as exc:
            self._broken("mongodb.stream.active", exc)

    def stream_closed(self, namespace: str) -> None:
        try:
            self.stream_active.add(-1, {"namespace": namespace})
        except Exception as exc:
            self._broken("mongodb.stream.active", exc)

    def reconnected(self, namespace: str, reason: str) -> None:
        try:
            self.reconnections.add(1, {"namespace": namespace, "reason": reason})
        except Exception as exc:
            self._broken("mongodb.stream.reconnections", exc)

    def received(self, namespace: str, wall_time: datetime | None, cluster_time: Any) -> None:
        lag = _seconds_since(wall_time, cluster_time)
        if lag is None:
            return
        try:
            self.receive_lag.record(lag, {"namespace": namespace})
        except Exception as exc:
            self._broken("mongodb.stream.receive_lag", exc)

    # -- handler events (middleware hooks, on worker threads) -----------------------------------------

    @staticmethod
    def _attributes(delivery: Delivery) -> dict[str, str]:
        event = delivery.event
        return {
            "event": delivery.subscription,
            "operation": str(event.operation_type),
            "namespace": event.namespace,
        }

    def before_delivery(self, delivery: Delivery) -> None:
        if delivery.replay:
            return
        lag = _seconds_since(delivery.event.wall_time, delivery.cluster_time)
        if lag is None:
            return
        try:
            self.oplog_lag.record(
                lag, {"event": delivery.subscription, "namespace": delivery.event.namespace}
            )
        except Exception as exc:
            self._broken("mongodb.oplog.lag", exc)

    def after_delivery(self, delivery: Delivery, error: BaseException | None, duration: float) -> None:
        attributes = self._attributes(delivery)
        try:
            self.handler_duration.record(duration, attributes)
            (self.processed if error is None else self.failed).add(1, attributes)
        except Exception as exc:
            self._broken("mongodb.changes.processed", exc)

    def after_retry_scheduled(self, delivery: Delivery, error: BaseException, delay: float) -> None:
        try:
            self.retries.add(1, self._attributes(delivery))
        except Exception as exc:
            self._broken("mongodb.changes.retries", exc)

    def after_dead_letter(self, delivery: Delivery, error: BaseException) -> None:
        self.after_skip(delivery, error)
        self.dead_letter_stored(delivery.subscription)

    def after_skip(self, delivery: Delivery, error: BaseException) -> None:
        try:
            self.dead_lettered.add(1, self._attributes(delivery))
        except Exception as exc:
            self._broken("mongodb.changes.dead_lettered", exc)

    # -- dead letters (the bus on storing one, DeadLetters on replay and quarantine) -------------------

    def _count(self, counter: Any, what: str, attributes: dict[str, str]) -> None:
        try:
            counter.add(1, attributes)
        except Exception as exc:
            self._broken(what, exc)

    def dead_letter_stored(self, event: str) -> None:
        """A dead letter was stored for subscription ``event``."""
        self._count(self.dlq_stored, "dlq.messages", {"event": event})

    def dead_letter_replayed(self, event: str) -> None:
        """A replay of one of subscription ``event``'s dead letters succeeded."""
        self._count(self.dlq_replayed, "dlq.messages.replayed", {"event": event})

    def dead_letter_replay_failed(self, event: str) -> None:
        """A replay of one of subscription ``event``'s dead letters failed."""
        self._count(self.dlq_replay_failures, "dlq.replay.failure", {"event": event})

    def dead_letter_quarantined(self, event: str, reason: str) -> None:
        """``reason``: ``terminal_error``, ``max_replay_attempts`` or ``manual``."""
        self._count(self.dlq_quarantined, "dlq.messages.quarantined", {"event": event, "reason": reason})

    def event_coalesced(self, subscription: str, operation: str, namespace: str) -> None:
        """An event waiting for subscription ``subscription`` was replaced by a newer one of its
        document (``Bus(coalesce=True)``); it is done once that one is."""
        self._count(
            self.coalesced,
            "mongodb.events.coalesced",
            {"event": subscription, "operation": operation, "namespace": namespace},
        )

    def after_delivery_skipped(self, delivery: Delivery, skip: Skip) -> None:
        counter, what = (
            (self.duplicates, "mongodb.changes.duplicates")
            if isinstance(skip, Duplicate)
            else (self.skipped, "mongodb.changes.skipped")
        )
        try:
            counter.add(1, self._attributes(delivery))
        except Exception as exc:
            self._broken(what, exc)

    def __repr__(self) -> str:
        return f"<Metrics namespace={self.namespace!r}>"
