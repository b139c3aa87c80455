"""The steps of a bus's start and stop that are not its state: stores, threads, stored positions.

``Bus`` keeps its state machine (``start``/``stop``/``_fail``/``_shutdown``, one state
lock) and :mod:`mongo_events.run` the parts of one run; this module holds what their steps
do to the parts: create the stores' indexes at start, check that threads can run at all,
stop the threads in order at stop, and, while stopped, write the stored positions
(``reset_resume_token()``, ``snapshot()``, ``rewind()``).
Why workers never hold the process exit is documented once, in :mod:`mongo_events.dispatch`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from bson.timestamp import Timestamp

from .bus_options import BusOptions
from .checkpointing import _takes_namespace
from .consumer import StreamConsumer
from .dispatch import Abandoned, DeadLetterHook, Dispatcher
from .errors import ConfigurationError, StoreError
from .flusher import Flusher
from .history import plan_rewind, rewind_token
from .snapshot import SnapshotProgress, progress_token
from .stores.base import ResumeTokenStore

__all__ = [
    "FINAL_FLUSH_MIN",
    "Store",
    "build_group_flusher",
    "build_threads",
    "check_threads_run",
    "close_stores",
    "ensure_indexes",
    "request_snapshot",
    "reset_positions",
    "rewind_positions",
    "stop_threads",
    "wait_for_stream",
]

#: These are the bus's own log lines (they moved here from bus.py): they keep its logger,
#: which users filter on and tests/test_runners.py checks.
log = logging.getLogger("mongo_events.bus")

#: The final checkpoint write at stop() gets at least this many seconds, even when the
#: callbacks used the whole timeout.
FINAL_FLUSH_MIN = 1.0


class Store(Protocol):
    """What start and stop do with every store of a bus."""

    def ensure_indexes(self) -> None: ...

    def close(self) -> None: ...


def ensure_indexes(stores: Iterable[Store | None], report: Callable[[BaseException, str], None]) -> None:
    """Create each store's indexes; a store that cannot is logged and ``report``-ed, not fatal."""
    for store in stores:
        if store is None:
            continue
        try:
            store.ensure_indexes()
        except StoreError as exc:
            log.warning(
                "could not create indexes for %s (%s); going on without them", type(store).__name__, exc
            )
            report(exc, f"create indexes ({type(store).__name__})")


def close_stores(stores: Iterable[Store | None]) -> None:
    """Close each store; a failure is logged, and the others are still closed."""
    for store in stores:
        if store is not None:
            try:
                store.close()
            except Exception:
                log.exception("closing %s failed", type(store).__name__)


def check_threads_run(name: str) -> None:
    """Fail fast where background threads cannot run: uWSGI without threads."""
    uwsgi: Any = sys.modules.get("uwsgi")
    if uwsgi is None:
        return
    opt = getattr(uwsgi, "opt", {}) or {}

    def on(key: str) -> bool:
        value = opt.get(key)
        return bool(value) and value not in (b"0", b"false", "0", "false")

    if not (on("enable-threads") or on("threads")):
        raise ConfigurationError(
            f"bus {name!r} needs threads, and this uWSGI runs without them: its watcher and workers "
            "would never run. Add enable-threads = true (or threads = N) to the uWSGI configuration, and "
            "lazy-apps = true so buses start after the fork"
        )


def build_threads(
    options: BusOptions,
    consumer: StreamConsumer,
    *,
    dead_letters: DeadLetterHook | None,
    fail: Callable[[BaseException], None],
    report: Callable[..., None],
) -> tuple[Dispatcher, Flusher]:
    """The worker pool and the flusher of one run, wired to ``consumer`` (not started yet).

    :param fail: stops the bus with an error; ``report(error, kind, what=...)`` tells ``on_error``.
    """
    # One pool per bus, on the consumer's window lock: finishing costs one acquisition.
    dispatcher = Dispatcher(
        max_workers=options.max_workers,
        decoder=options.decoder,
        middleware=options.chain,
        on_done=consumer.window.finish,
        on_fatal=fail,
        dead_letters=dead_letters,
        bus_name=options.name,
        lock=consumer.window.mutex,
    )
    tasks = [consumer.checkpointer.flush]
    if options.monitor is not None:
        flush_monitor = options.monitor.flush
        if options.on_error is not None:
            flush_monitor = _reporting(flush_monitor, "write monitor entries", report)
        tasks.append(flush_monitor)
    if options.metrics is not None:
        tasks.append(consumer.oplog.refresh)
    flusher = Flusher(tasks, options.flush_interval, options.name, on_fatal=fail)
    consumer.attach(dispatcher, flusher.wake)
    return dispatcher, flusher


def build_group_flusher(
    options: BusOptions,
    flush_partitions: Callable[[], None],
    *,
    fail: Callable[[BaseException], None],
    report: Callable[..., None],
) -> Flusher:
    """The flusher of a consumer-group member's run: every held partition's writes, then the
    monitor's (not started yet)."""
    tasks = [flush_partitions]
    if options.monitor is not None:
        flush_monitor = options.monitor.flush
        if options.on_error is not None:
            flush_monitor = _reporting(flush_monitor, "write monitor entries", report)
        tasks.append(flush_monitor)
    return Flusher(tasks, options.flush_interval, options.name, on_fatal=fail)


def _reporting(task: Callable[[], None], what: str, report: Callable[..., None]) -> Callable[[], None]:
    """A flusher task that reports its failures (kind ``store``) before they propagate."""

    def run() -> None:
        try:
            task()
        except Exception as exc:
            report(exc, "store", what=what)
            raise

    return run


def wait_for_stream(consumer: StreamConsumer, name: str, namespace: str, timeout: float) -> None:
    """Wait up to ``timeout`` for the first stream: raise why it could not open, or, if it
    is still trying, say so loudly and return (``start()`` must not hang on a server that is down).
    """
    if consumer.connected.wait(timeout):
        if consumer.connect_error is not None:
            raise consumer.connect_error
        return
    # Web apps start at boot and must not hang on a server that is down: keep trying in
    # the background, but loudly: ERROR here and at each retry, health "unhealthy".
    message = (
        f"the change stream on {namespace} did not open within {timeout:.0f}s; still trying in the background"
    )
    consumer.last_error = (message, datetime.now(timezone.utc))
    log.error("bus %s: %s; health is unhealthy and nothing is delivered until it opens", name, message)


def stop_threads(
    name: str,
    consumer: StreamConsumer,
    dispatcher: Dispatcher | None,
    flusher: Flusher | None,
    *,
    stop_event: threading.Event,
    deadline: float,
    hurry: threading.Event,
) -> Abandoned | None:
    """The shutdown steps of one run; returns the callbacks still running when it stopped
    waiting for them (the caller says so: they are delivered again).

    ``hurry`` (a second signal in ``run_forever()``) cuts the waits for callbacks short.
    """
    # Order matters: stop reading first so nothing new is admitted; then stop
    # handing out work and let running callbacks finish; then write the
    # watermark, which now covers everything that finished.
    stop_event.set()
    with consumer.window.cond:
        consumer.window.cond.notify_all()
    consumer.stop_watcher(deadline, hurry)  # a second signal stops waiting for it
    abandoned = None
    if dispatcher is not None:
        dispatcher.halt()
        if not dispatcher.wait_idle(deadline, hurry):
            abandoned = dispatcher.abandoned()
        # Idle workers end at once (halt woke them); busy ones are daemon threads that
        # cannot be stopped: they end when their callback returns, and never hold exit.
        soon = time.monotonic() + FINAL_FLUSH_MIN / 2
        dispatcher.join(soon if hurry.is_set() else max(deadline, soon))
        dispatcher.shutdown()
    if flusher is not None:
        # The flusher thread and the one final write share what is left of the timeout,
        # and at least FINAL_FLUSH_MIN (all of it after a second signal). An unreachable
        # store cannot hold stop() for pymongo's default 30 s server selection:
        # pymongo.timeout() bounds every operation of the final write.
        now = time.monotonic()
        grace = now + FINAL_FLUSH_MIN if hurry.is_set() else max(deadline, now + FINAL_FLUSH_MIN)
        flusher.stop(grace - now)
        budget = max(0.0, grace - time.monotonic())
        if not flusher.flush(timeout=budget):
            log.error(
                "bus %s: the final checkpoint was not stored within %.1fs; the next start redelivers "
                "every event after the last stored checkpoint (%s)",
                name,
                grace - now,
                consumer.last_error[0] if consumer.last_error else "no error recorded",
            )
    return abandoned


# -- stored positions (while the bus is stopped) ---------------------------------------------


def reset_positions(options: BusOptions, keys: Sequence[str]) -> None:
    """Delete the stored checkpoints ``keys`` (``Bus.reset_resume_token()``).

    A consumer group's partitions get a position at the current cluster time instead: a
    partition without a checkpoint starts where the group began, not "now".
    """
    store = options.token_store
    if store is not None and options.group is not None and options.start_from_past is None:
        now = options.db.client.admin.command("ping").get("operationTime")
        if isinstance(now, Timestamp):
            for key in keys:
                _save_marker(options, store, key, rewind_token(now), now)
                log.info("bus %s: resume token %s reset to now (cluster time %s)", options.name, key, now)
            return
    if options.token_store is not None:
        for key in keys:
            options.token_store.delete(key)
            log.info("bus %s: resume token %s reset", options.name, key)


def request_snapshot(options: BusOptions, keys: Sequence[str]) -> None:
    """Store a "snapshot requested" marker as each checkpoint of ``keys`` (``Bus.snapshot()``)."""
    if options.token_store is None:
        raise ConfigurationError(
            f"bus {options.name!r} has no resume-token store to keep the request: pass snapshot='always'"
        )
    if options.level == "cluster" and not options.snapshot_collections:
        raise ConfigurationError('a cluster bus snapshots only snapshot_collections=["db.coll", ...]')
    for key in keys:
        _save_marker(options, options.token_store, key, progress_token(SnapshotProgress(None)), None)
    log.info("bus %s: a snapshot will run at the next start", options.name)


def rewind_positions(options: BusOptions, keys: Sequence[str], to: datetime | Timestamp) -> None:
    """Store a rewind marker to cluster time ``to`` as each checkpoint of ``keys`` (``Bus.rewind()``)."""
    if options.token_store is None:
        raise ConfigurationError(
            f"bus {options.name!r} has no resume-token store: there is nothing to rewind"
        )
    plan = plan_rewind(options.db.client, to, count=False)
    for key in keys:
        _save_marker(options, options.token_store, key, rewind_token(plan.to), plan.to)
        log.info("bus %s: rewound %s to cluster time %s", options.name, key, plan.to)


def _save_marker(
    options: BusOptions, store: ResumeTokenStore, key: str, token: Mapping[str, Any], at: Timestamp | None
) -> None:
    """Store a snapshot or rewind marker as checkpoint ``key`` (with what it watches, if the store keeps it)."""
    where = {"namespace": options.namespace, "level": options.level} if _takes_namespace(store) else {}
    store.save(key, token, at, **where)
