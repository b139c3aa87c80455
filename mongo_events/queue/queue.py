"""The durable queue: publish into MongoDB, deliver to competing consumers through the bus's dispatcher.

One fetcher thread per queue claims messages by status (pending, or in flight
past the visibility timeout) and hands them to the same :class:`Dispatcher` the
bus uses, so retries, ``Retry``/``Reject``, dead letters, middleware and
idempotency behave exactly as for change events. A finished message is acked
(in batches); a message this process holds has its visibility renewed while it
is retried; on ``stop()`` the messages it never finished go back to pending.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
import signal as _signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from functools import partial
from types import TracebackType
from typing import Any, Literal

import attrs
from bson import ObjectId
from pymongo.collection import Collection

from ..decoding import CattrsDecoder, Decoder
from ..dispatch import DeadLetterHook, Dispatcher, WorkItem
from ..errors import BusStateError, ConfigurationError, HandlerFailed, ShutdownTimeout, StoreError
from ..events import ChangeEvent
from ..guard import run_guarded
from ..idempotency.base import IdempotencyStore
from ..idempotency.guard import Idempotency
from ..metrics import Metrics
from ..middleware.base import Middleware
from ..monitor.middleware import MonitorMiddleware
from ..monitor.store import MonitorStore
from ..retrying import RetryBackoff
from ..stores.base import DeadLetterStore
from ..stores.records import DeadLetter
from ..subscription import OnExhausted, Subscription
from ..tracking import Slot
from .signal import RedisSignal
from .store import MessageStore, QueueStats, StoredMessage

__all__ = ["Queue", "QueueHealth"]

log = logging.getLogger(__name__)


@attrs.frozen
class QueueHealth:
    """A queue's health (Go's composite health).

    :ivar status: ``unhealthy`` when not running (or failed), ``degraded`` while a
        configured signal is down (consumers poll), else ``healthy``.
    :ivar running: the queue is started and has not failed.
    :ivar signal: ``"none"``, ``"up"`` or ``"down"``.
    :ivar poll_interval: seconds between polls.
    :ivar events: the subscribed event names.
    :ivar in_flight: messages this process holds.
    :ivar signal_failures: publishes whose signal failed (the message was stored).
    :ivar last_error: the last store or signal error, if any.
    """

    status: Literal["healthy", "degraded", "unhealthy"]
    running: bool
    signal: str
    poll_interval: float
    events: tuple[str, ...]
    in_flight: int
    signal_failures: int
    last_error: str | None


@attrs.define
class _Consumer:
    event: str
    sub: Subscription
    ordered: bool


class Queue:
    """A durable publish/subscribe queue on a MongoDB collection.

    :param collection: the ``pymongo`` collection of messages.
    :param signal: a :class:`RedisSignal` that wakes idle consumers at once; without
        it (or while it is down) consumers poll every ``poll_interval``.
    :param visibility_timeout: seconds after which a message claimed by a consumer
        that died is claimable again (a live consumer renews it while it holds it).
    :param poll_interval: seconds between polls when idle.
    :param ttl: delete acked messages this many seconds after their ack (a TTL index).
    :param name: the queue's name in logs, deliveries and dead letters (default ``"queue"``).
    :param max_workers: callback threads.
    :param prefetch: messages a consumer holds at most (default ``2 * max_workers``).
    :param dead_letters: a :class:`DeadLetterStore` or ``fn(event, subscription, error, attempts)``.
    :param middleware: :class:`Middleware` around every attempt.
    :param decoder: decodes payloads into ``payload=`` types (default: cattrs).
    :param metrics: a :class:`~mongo_events.Metrics`: handler counters and durations,
        retries and dead letters, attributed to the subscription (its per-bus gauges,
        such as pending and checkpoint age, are not reported for a queue).
    :param monitor: a :class:`~mongo_events.monitor.MonitorStore` (or its middleware):
        one entry per message and subscription, written in batches from the fetcher.
    """

    def __init__(
        self,
        collection: Collection[Any],
        *,
        signal: RedisSignal | None = None,
        visibility_timeout: float = 300.0,
        poll_interval: float = 5.0,
        ttl: float | None = None,
        name: str | None = None,
        max_workers: int = 8,
        prefetch: int | None = None,
        dead_letters: DeadLetterStore | DeadLetterHook | None = None,
        middleware: Sequence[Middleware] = (),
        decoder: Decoder | None = None,
        metrics: Metrics | None = None,
        monitor: MonitorStore | MonitorMiddleware | None = None,
    ) -> None:
        if (
            isinstance(poll_interval, bool)
            or not isinstance(poll_interval, (int, float))
            or poll_interval <= 0
        ):
            raise ConfigurationError(
                f"poll_interval must be a positive number of seconds, got {poll_interval!r}"
            )
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ConfigurationError(f"max_workers must be an int >= 1, got {max_workers!r}")
        if prefetch is not None and (
            isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1
        ):
            raise ConfigurationError(f"prefetch must be an int >= 1 or None, got {prefetch!r}")
        self.store = MessageStore(collection, visibility_timeout=visibility_timeout, ttl=ttl)
        self.signal = signal
        self.poll_interval = float(poll_interval)
        self.name = name or "queue"
        self.max_workers = max_workers
        self.prefetch = prefetch or 2 * max_workers
        self.dead_letter_store = dead_letters if isinstance(dead_letters, DeadLetterStore) else None
        self._dead_letters: DeadLetterHook | None = (
            self._store_dead_letter if self.dead_letter_store is not None else dead_letters  # type: ignore[assignment]
        )
        self.monitor: MonitorMiddleware | None = (
            MonitorMiddleware(monitor) if isinstance(monitor, MonitorStore) else monitor
        )
        self._middleware = [m for m in (self.monitor, metrics) if m is not None] + list(middleware)
        self._monitor_flushed = 0.0
        self._decoder = decoder or CattrsDecoder()
        #: This process's consumer id: claims and visibility renewals carry it.
        self.consumer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._consumers: dict[str, _Consumer] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._dispatcher: Dispatcher | None = None
        self._fetcher: threading.Thread | None = None
        self._held: dict[str, StoredMessage] = {}  # message id -> message, claimed and not finished
        self._to_ack: list[StoredMessage] = []
        self._seq = itertools.count(1)
        self._error: BaseException | None = None
        self._started = False
        self._pid = os.getpid()
        self.signal_failures = 0
        self._last_error: str | None = None

    # -- configuration -------------------------------------------------------------

    def subscribe(
        self,
        callback: Callable[..., Any] | None = None,
        /,
        *,
        event: str,
        payload: Any = None,
        name: str | None = None,
        max_retries: int = 5,
        retry_backoff: RetryBackoff | None = None,
        on_exhausted: OnExhausted = "stop",
        idempotency: IdempotencyStore | Idempotency | None = None,
        ordered: bool = False,
    ) -> Any:
        """Handle the messages of ``event``; use as ``queue.subscribe(fn, event=...)`` or a decorator.

        The callback takes ``(payload)`` or ``(payload, delivery)``: the published
        document, or with ``payload=T`` that document decoded into ``T``.
        ``delivery.event.raw["headers"]``, ``["key"]`` and ``["retry_count"]`` carry the
        rest of the message. One subscription per event per queue: competing
        consumers are other processes (or queues) subscribing to the same event.

        :param ordered: messages published with the same ``key=`` run one at a time,
            in publish order, across every consumer.
        :raises ConfigurationError: for a second subscription to ``event``, or a bad option.
        """
        if not isinstance(event, str) or not event:
            raise ConfigurationError(f"event must be a non-empty str, got {event!r}")

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            if self._started:
                raise BusStateError(f"queue {self.name!r} has started: subscribe before start()")
            if event in self._consumers:
                raise ConfigurationError(f"queue {self.name!r} already has a subscription to {event!r}")
            guard = Idempotency(idempotency) if isinstance(idempotency, IdempotencyStore) else idempotency
            sub = Subscription(
                fn,
                name=name or event,
                payload=payload,
                max_retries=max_retries,
                retry_backoff=retry_backoff,
                on_exhausted=on_exhausted,
                full_document_only=True,  # the callback receives the payload document
                index=len(self._consumers),
                idempotency=guard,
            )
            self._consumers[event] = _Consumer(event, sub, bool(ordered))
            return fn

        if callback is None:
            return register
        return register(callback)

    # -- publishing ----------------------------------------------------------------------

    def publish(
        self,
        event: str,
        payload: Any,
        *,
        key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        session: Any = None,
    ) -> str:
        """Store a message (this must succeed, else :class:`StoreError`), then ring the signal.

        :param payload: a mapping, dataclass or attrs instance (stored as a document).
        :param key: the ordering key for ``ordered=True`` subscriptions.
        :param session: a ``pymongo`` ``ClientSession``: inside its transaction the
            message exists if and only if the transaction commits (the outbox pattern).
        :returns: the message's sequence id.
        """
        message_id = self.store.append(event, _document(payload), key=key, headers=headers, session=session)
        if session is None or not getattr(session, "in_transaction", False):
            self._ring(event, message_id)
        return message_id

    def publish_many(
        self,
        messages: Sequence[tuple[str, Any] | tuple[str, Any, str | None]],
        *,
        session: Any = None,
    ) -> list[str]:
        """Store ``(event, payload)`` or ``(event, payload, key)`` messages in one round trip; returns their ids."""
        rows = [(m[0], _document(m[1]), m[2] if len(m) > 2 else None, None) for m in messages]
        ids = self.store.append_many(rows, session=session)
        if session is None or not getattr(session, "in_transaction", False):
            for event in dict.fromkeys(r[0] for r in rows):
                self._ring(event, ids[-1])
        return ids

    def notify(self, event: str) -> None:
        """Ring the signal for ``event`` (after committing a transaction that published to it).

        A publish inside a transaction rings nothing, since its message is not visible
        before the commit; without this call consumers find it at their next poll.
        """
        self._ring(event, "")

    def _ring(self, event: str, message_id: str) -> None:
        if event in self._consumers:
            self._wake.set()  # a consumer in this process needs no Redis
        if self.signal is None:
            return
        try:
            self.signal.ring(event, message_id)
        except Exception as exc:  # the message is stored: consumers find it at their next poll
            self.signal_failures += 1
            self._last_error = f"signal: {exc}"
            log.warning(
                "queue %s: message %s stored, but its signal failed (%s); consumers poll for it",
                self.name,
                message_id,
                exc,
            )

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> Queue:
        """Create the indexes and start consuming; returns the queue."""
        if self._started:
            raise BusStateError(f"queue {self.name!r} already started")
        if not self._consumers:
            raise ConfigurationError(
                f"queue {self.name!r} has no subscriptions: call subscribe() before start()"
            )
        self._started = True
        try:
            self.store.ensure_indexes()
        except StoreError as exc:
            log.warning("queue %s: could not create indexes (%s); going on without them", self.name, exc)
        self._dispatcher = Dispatcher(
            max_workers=self.max_workers,
            decoder=self._decoder,
            middleware=self._middleware,
            on_done=self._on_done,
            on_fatal=self._fail,
            dead_letters=self._dead_letters,
            bus_name=self.name,
            lock=self._lock,
        )
        self._dispatcher.start()
        if self.signal is not None:
            self.signal.listen(list(self._consumers), lambda _event: self._wake.set())
        self._fetcher = threading.Thread(
            target=partial(
                run_guarded, self._fetch_loop, self._fail, f"mongo_events.queue-fetch[{self.name}]"
            ),
            name=f"mongo_events.queue-fetch[{self.name}]",
            daemon=True,
        )
        self._fetcher.start()
        log.info(
            "queue %s started: consuming %s as %s", self.name, ", ".join(self._consumers), self.consumer_id
        )
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming, let running callbacks finish (up to ``timeout``), ack what finished,
        and give back the messages never finished (they are claimable again at once).

        :raises ShutdownTimeout: when callbacks still ran at the deadline (their messages
            are redelivered after the visibility timeout).
        """
        if not self._started or self._stopped.is_set():
            return
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        if self._fetcher is not None and self._fetcher is not threading.current_thread():
            self._fetcher.join(max(0.0, deadline - time.monotonic()))
        if self.signal is not None:
            self.signal.close()
        late: list[str] = []
        dispatcher = self._dispatcher
        if dispatcher is not None:
            dispatcher.halt()
            if not dispatcher.wait_idle(deadline):
                late = dispatcher.running()
            dispatcher.join(deadline)
            with self._lock:
                dispatcher.drain()
            dispatcher.shutdown()
        try:
            self._flush_acks()
        except StoreError:  # logged; unacked messages are redelivered after the visibility timeout
            with self._lock:
                self._to_ack.clear()
        with self._lock:
            # A callback still running keeps its message (redelivered after the visibility timeout).
            unfinished = [m for m in self._held.values() if not any(f"on event {m.id} " in r for r in late)]
            self._held.clear()
        by_event: dict[str, list[str]] = {}
        for message in unfinished:
            by_event.setdefault(message.event, []).append(message.id)
        for event, ids in by_event.items():
            try:
                self.store.release(event, ids, owner=self.consumer_id)
            except StoreError as exc:
                log.warning(
                    "queue %s: could not give back %d message(s) (%s); they return after the visibility timeout",
                    self.name,
                    len(ids),
                    exc,
                )
        self._flush_monitor(force=True)
        self._stopped.set()
        log.info("queue %s stopped", self.name)
        if late:
            raise ShutdownTimeout(
                f"queue {self.name!r} stopped with callbacks still running: {'; '.join(late)}"
            )

    def run_forever(self) -> None:
        """Start, then block until SIGINT/SIGTERM (or a failure), then stop; re-raises a failure."""
        stop = threading.Event()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (_signal.SIGINT, _signal.SIGTERM):
                previous[signum] = _signal.signal(signum, lambda *_: stop.set())
        try:
            self.start()
            while not stop.is_set() and self._error is None:
                stop.wait(0.5)
        finally:
            for signum, handler in previous.items():
                _signal.signal(signum, handler)
            self.stop()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> Queue:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def error(self) -> BaseException | None:
        """What stopped the queue, if it failed."""
        return self._error

    def stats(self, event: str | None = None) -> QueueStats:
        """Message counts by status (all events when ``event`` is ``None``)."""
        return self.store.stats(event)

    def purge(self, older_than: float) -> int:
        """Delete messages acked more than ``older_than`` seconds ago; returns the count."""
        return self.store.purge(older_than)

    def health(self) -> QueueHealth:
        running = self._started and not self._stopped.is_set() and self._error is None
        signal = "none" if self.signal is None else ("up" if self.signal.healthy else "down")
        status: Literal["healthy", "degraded", "unhealthy"]
        status = "unhealthy" if not running else ("degraded" if signal == "down" else "healthy")
        with self._lock:
            held = len(self._held)
        return QueueHealth(
            status,
            running,
            signal,
            self.poll_interval,
            tuple(self._consumers),
            held,
            self.signal_failures,
            self._last_error,
        )

    # -- consuming --------------------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
            log.error("queue %s failed: %s", self.name, error)
        # Stop claiming before the message goes back to pending: else the fetcher could claim
        # it again at once and run it a second time (and nack it twice) while the queue stops.
        self._stopping.set()
        if isinstance(error, HandlerFailed) and error.event_id:
            with self._lock:
                message = self._held.pop(error.event_id, None)
            if (
                message is not None
            ):  # given up with on_exhausted="stop": back to pending, one more retry counted
                try:
                    self.store.nack(message.event, message.id)
                except StoreError as exc:
                    log.warning("queue %s: could not nack %s (%s)", self.name, message.id, exc)
        self._stopping.set()
        self._wake.set()

    def _on_done(self, slots: list[Slot]) -> None:
        """The dispatcher finished these (holding ``_lock``): ack them from the fetcher thread."""
        for slot in slots:
            message = self._held.pop(slot.event_id, None)
            if message is not None:
                self._to_ack.append(message)
        self._wake.set()

    def _flush_acks(self) -> None:
        with self._lock:
            if self._dispatcher is not None:
                self._dispatcher.drain()
            batch, self._to_ack = self._to_ack, []
        by_event: dict[str, list[str]] = {}
        for message in batch:
            by_event.setdefault(message.event, []).append(message.id)
        failed: list[StoredMessage] = []
        for event, ids in by_event.items():
            try:
                self.store.ack(event, ids)
            except StoreError as exc:
                self._last_error = str(exc)
                log.warning(
                    "queue %s: could not ack %d message(s) (%s); trying again", self.name, len(ids), exc
                )
                failed.extend(m for m in batch if m.event == event)
        if failed:
            with self._lock:
                self._to_ack[:0] = failed
            raise StoreError("ack failed")

    def _fetch_loop(self) -> None:
        backoff = self.poll_interval
        renew_every = self.store.visibility_timeout / 3
        renewed = time.monotonic()
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                self._flush_acks()
                self._flush_monitor()
                if time.monotonic() - renewed >= renew_every:
                    self._renew()
                    renewed = time.monotonic()
                claimed = self._claim()
            except StoreError as exc:
                self._last_error = str(exc)
                log.warning(
                    "queue %s: store unavailable (%s); trying again in %.1fs", self.name, exc, backoff
                )
                self._wake.wait(backoff * random.uniform(0.9, 1.1))
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = self.poll_interval
            if claimed:
                continue  # drain: claim again until the store has nothing (or we hold enough)
            self._wake.wait(
                min(self.poll_interval, renew_every, 0.5 if self.monitor is not None else renew_every)
            )

    def _flush_monitor(self, force: bool = False) -> None:
        """Write the monitor's entries, at most every half second (best effort, as in the bus)."""
        if self.monitor is None or (not force and time.monotonic() - self._monitor_flushed < 0.5):
            return
        self._monitor_flushed = time.monotonic()
        try:
            self.monitor.flush()
        except Exception as exc:
            log.warning(
                "queue %s: could not write monitor entries (%s); retried with the next batch", self.name, exc
            )

    def _renew(self) -> None:
        with self._lock:
            ids = list(self._held)
        if ids:
            self.store.touch(ids, owner=self.consumer_id)

    def _claim(self) -> int:
        dispatcher = self._dispatcher
        assert dispatcher is not None
        total = 0
        for consumer in self._consumers.values():
            with self._lock:
                room = self.prefetch - len(self._held)
            if room <= 0 or self._stopping.is_set():
                return total
            messages = self.store.claim(
                consumer.event, owner=self.consumer_id, limit=room, ordered=consumer.ordered
            )
            if messages and self._stopping.is_set():
                # The queue began to stop (or failed) while this claim ran: hand them back unstarted.
                self.store.release(consumer.event, [m.id for m in messages], owner=self.consumer_id)
                return total
            runnable = []
            with self._lock:
                for message in messages:
                    self._held[message.id] = message
                    item = WorkItem(
                        consumer.sub,
                        self._event(message),
                        Slot(next(self._seq), message.id, None, 1, message.id),
                        message.key if consumer.ordered else None,
                        None,
                    )
                    item.attempt = (
                        message.retry_count + 1
                    )  # max_retries counts nacks by earlier consumers too
                    ready = dispatcher.admit(item)
                    if ready is not None:
                        runnable.append(ready)
            for ready in runnable:
                dispatcher.enqueue(ready)
            total += len(messages)
        return total

    def _event(self, message: StoredMessage) -> ChangeEvent:
        coll = self.store.collection
        raw = {
            "_id": {"_data": message.id},
            "operationType": "insert",
            "ns": {"db": coll.database.name, "coll": coll.name},
            "documentKey": {"_id": ObjectId(message.id)},
            "fullDocument": message.payload,
            "event": message.event,
            "key": message.key,
            "headers": dict(message.headers),
            "retry_count": message.retry_count,
            "timestamp": message.timestamp,
        }
        return ChangeEvent.from_raw(raw)

    def _store_dead_letter(
        self, event: ChangeEvent, subscription: str, error: BaseException, attempts: int
    ) -> None:
        store = self.dead_letter_store
        assert store is not None
        store.store(
            DeadLetter(
                id=str(ObjectId()),
                event_name=str(event.raw.get("event") or subscription),
                original_id=event.id,
                payload=dict(event.full_document or {}),
                metadata={
                    "queue": self.name,
                    "subscription": subscription,
                    "key": event.raw.get("key"),
                    "headers": event.raw.get("headers"),
                },
                error=f"{type(error).__name__}: {error}",
                retry_count=attempts - 1,
                source=self.name,
                created_at=datetime.now(timezone.utc),
            )
        )


def _document(payload: Any) -> Mapping[str, Any]:
    if isinstance(payload, Mapping):
        return payload
    if dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        return dataclasses.asdict(payload)
    if attrs.has(type(payload)):
        return attrs.asdict(payload)
    raise ConfigurationError(
        f"payload must be a mapping, dataclass or attrs instance, got {type(payload).__name__}"
    )
