"""The initial snapshot: existing documents delivered as events, then the stream.

A snapshot first records the stream's start position ``T0`` (the post-batch token of a
fresh change stream) as the checkpoint, then reads the target's documents in ``_id``
order, in batches, and hands each one to the consumer as a ``snapshot`` event through
the same window, lanes, retries and dead letters as a change. Then the stream resumes
after ``T0``: changes made during the scan arrive again as change events.

Progress lives in the checkpoint itself: each snapshot event's token is a *progress
marker* naming ``T0``, the collection and the document's ``_id``, so the window's
watermark rule stores "every document up to this ``_id`` is done" with the same
batching as stream checkpoints. After a crash the scan continues after that ``_id``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import attrs
import bson
from bson.timestamp import Timestamp
from pymongo import MongoClient
from pymongo.collection import Collection as MongoCollection
from pymongo.database import Database
from pymongo.errors import ConnectionFailure, CursorNotFound

from .errors import ResumeTokenLost
from .guard import run_guarded
from .health import OplogWindow
from .stores.base import token_problem
from .watcher import Position

__all__ = [
    "SnapshotMode",
    "SnapshotProgress",
    "SnapshotRunner",
    "loaded_token",
    "outrun_warning",
    "parse_progress",
    "progress_token",
    "stored_fields",
    "token_timestamp",
]

log = logging.getLogger(__name__)

SnapshotMode = Literal["initial", "always"]

_PREFIX = "mongo-events:snapshot:"

#: Times in a row the scan's cursor may die and be reopened before the snapshot fails.
_CURSOR_RETRIES = 3


@attrs.frozen
class SnapshotProgress:
    """Where a snapshot stands, as stored in a checkpoint token.

    :ivar start: the stream's start token ``T0`` (``None``: a snapshot was requested and
        has not started).
    :ivar namespace: the collection being read (``db.coll``).
    :ivar after: the last ``_id`` whose events are all done (meaningful when ``has_after``).
    """

    start: Mapping[str, Any] | None
    namespace: str = ""
    after: Any = None
    has_after: bool = False


def progress_token(progress: SnapshotProgress) -> dict[str, str]:
    """The checkpoint token that stores ``progress``."""
    doc: dict[str, Any] = {"ns": progress.namespace}
    if progress.start is not None:
        doc["t0"] = dict(progress.start)
    if progress.has_after:
        doc["after"] = progress.after
    return {"_data": _PREFIX + bson.encode(doc).hex()}


def parse_progress(token: Any) -> SnapshotProgress | None:
    """The snapshot progress in a checkpoint token, or ``None`` for any other token."""
    if not isinstance(token, Mapping):
        return None
    data = token.get("_data")
    if not isinstance(data, str) or not data.startswith(_PREFIX):
        return None
    try:
        doc = bson.decode(bytes.fromhex(data[len(_PREFIX) :]))
    except (ValueError, bson.errors.BSONError):
        return None
    return SnapshotProgress(doc.get("t0"), str(doc.get("ns", "")), doc.get("after"), "after" in doc)


def stored_fields(token: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """How a store writes a checkpoint token: ``(token field, snapshot field or None)``.

    A progress marker with ``T0`` is stored as ``T0`` itself, a real resume token that
    any reader (the Go library too) can resume from, plus a ``snapshot`` document beside
    it: ``{"t0": T0, "ns": "db.coll", "after": last finished _id}`` (no ``after`` before
    the first). A requested snapshot that has not taken ``T0`` yet stays a marker.
    """
    progress = parse_progress(token)
    if progress is None or progress.start is None:
        return dict(token), None
    doc: dict[str, Any] = {"t0": dict(progress.start), "ns": progress.namespace}
    if progress.has_after:
        doc["after"] = progress.after
    return dict(progress.start), doc


def loaded_token(token: Mapping[str, Any], snapshot: Any, where: str) -> Mapping[str, Any]:
    """The checkpoint token a stored entry means: the marker again when its ``snapshot``
    field belongs to its token (see :func:`stored_fields`).

    A ``snapshot`` field whose ``t0`` is not the stored token is stale: something that
    does not know snapshots (the Go library, an old version, a rewind) wrote the token
    since; the token wins and the scan is not resumed (logged).

    :raises ValueError: naming the problem, when ``snapshot`` is malformed.
    """
    if not isinstance(snapshot, Mapping):
        raise ValueError(f"its snapshot field is a {type(snapshot).__name__}, not a document")
    t0, ns = snapshot.get("t0"), snapshot.get("ns")
    problem = "it is missing" if t0 is None else token_problem(t0)
    if problem is not None:
        raise ValueError(f"its snapshot field's T0 is unusable: {problem.replace('its token', 'T0')}")
    assert isinstance(t0, Mapping)  # token_problem said so
    if not isinstance(ns, str) or not ns:
        raise ValueError(f"its snapshot field names no collection (ns={ns!r})")
    unknown = set(snapshot) - {"t0", "ns", "after"}
    if unknown:
        raise ValueError(
            f"its snapshot field has unknown fields {sorted(unknown)} (written by a newer version?)"
        )
    if dict(t0) != dict(token):
        log.warning(
            "the checkpoint in %s holds snapshot progress for T0 %s but its token is %s, written since by "
            "something that does not know snapshots: the token wins, the snapshot is not resumed",
            where,
            t0.get("_data"),
            token.get("_data"),
        )
        return token
    return progress_token(SnapshotProgress(t0, ns, snapshot.get("after"), "after" in snapshot))


def snapshot_targets(
    target: MongoCollection[Any] | Database[Any] | MongoClient[Any], collections: Sequence[str] | None
) -> list[MongoCollection[Any]]:
    """The collections a snapshot reads, in a fixed order.

    A collection bus reads its collection; a database bus ``collections`` (names, or
    ``db.coll``) or else every collection but ``system.*`` and the library's ``_event_*``
    stores; a cluster bus needs ``collections`` as ``db.coll``.
    """
    if isinstance(target, MongoCollection):
        return [target]
    client = target if isinstance(target, MongoClient) else target.client
    if collections is None:
        assert isinstance(target, Database)
        names = sorted(n for n in target.list_collection_names() if not n.startswith(("system.", "_event_")))
        return [target[n] for n in names]
    out = []
    for name in collections:
        db, dot, coll = name.partition(".")
        if dot and (isinstance(target, MongoClient) or db == target.name):
            out.append(client[db][coll])
        else:
            assert isinstance(target, Database)
            out.append(target[name])
    return out


class SnapshotRunner:
    """Reads one snapshot on its own thread, then starts the stream at ``T0``.

    :param name: the bus's name (logs, thread name).
    :param target: what the bus watches (``T0`` is taken by a change stream on it).
    :param collections: what to read, in order (see :func:`snapshot_targets`).
    :param progress: where to continue (``start`` ``None``: take ``T0`` now).
    :param on_event: the consumer's ``on_event`` (False: stop).
    :param release: hands collected work to the workers (after each batch).
    :param save_start: stores the first progress marker as the checkpoint (raises on failure).
    :param start_stream: opens the stream at the given position when the scan is done.
    :param connected: tells ``start()`` the bus is going (``None``) or failed (an error).
    :param fail: stops the bus with an error.
    :param oplog: the oplog window (headroom check).
    :param history_lost_raises: ``T0`` lost from the oplog fails the bus (else an ERROR line).
    :param key: the checkpoint key (named by :class:`ResumeTokenLost`).
    """

    def __init__(
        self,
        *,
        name: str,
        target: MongoCollection[Any] | Database[Any] | MongoClient[Any],
        collections: Sequence[MongoCollection[Any]],
        progress: SnapshotProgress,
        query: Mapping[str, Any] | None,
        batch_size: int,
        on_event: Callable[[Mapping[str, Any]], bool],
        release: Callable[[], None],
        save_start: Callable[[Mapping[str, Any]], None],
        start_stream: Callable[[Position], None],
        connected: Callable[[BaseException | None], None],
        fail: Callable[[BaseException], None],
        translate: Callable[[BaseException], BaseException],
        oplog: OplogWindow,
        history_lost_raises: bool,
        stop_event: threading.Event,
        key: str | None = None,
    ) -> None:
        self.name = name
        self._target = target
        self._collections = list(collections)
        self._progress = progress
        self._query = dict(query) if query else None
        self._batch_size = batch_size
        self._on_event = on_event
        self._release = release
        self._save_start = save_start
        self._start_stream = start_stream
        self._connected = connected
        self._fail = fail
        self._translate = translate
        self._oplog = oplog
        self._raise_on_loss = history_lost_raises
        self._stop = stop_event
        self._key = key
        #: ``"snapshot"`` while reading, ``"streaming"`` after.
        self.phase = "snapshot"
        #: Documents read (handed to the window) in this run.
        self.read = 0
        #: Estimated documents in the collections still to read when this run began.
        self.total: int | None = None
        self._warned_at: float | None = None
        self._lost_said = False
        #: The oldest oplog entry when the scan first looked, and when (monotonic).
        self._first_oldest: tuple[Timestamp, float] | None = None
        thread = f"mongo_events.snapshot[{name}]"
        # Under the guard like every bus thread: a BaseException escaping _run fails the bus too.
        self._thread = threading.Thread(
            target=partial(run_guarded, self._run, self._fail, thread), name=thread, daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> bool:
        self._thread.join(max(0.0, timeout))
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            progress = self._progress
            if progress.start is None:
                with self._target.watch() as stream:
                    start = stream.resume_token
                if start is None:
                    raise RuntimeError("the change stream returned no start token to record as T0")
                first = self._collections[0].full_name if self._collections else ""
                progress = SnapshotProgress(start, first)
                self._save_start(progress_token(progress))
                log.info("bus %s: snapshot starts; the stream will resume at %s", self.name, start)
            else:
                log.info(
                    "bus %s: snapshot continues in %s after _id %r",
                    self.name,
                    progress.namespace,
                    progress.after if progress.has_after else "(start)",
                )
            self._connected(None)
            assert progress.start is not None
            names = [c.full_name for c in self._collections]
            index = names.index(progress.namespace) if progress.namespace in names else 0
            try:
                self.total = sum(c.estimated_document_count() for c in self._collections[index:])
            except Exception:
                self.total = None
            began = time.monotonic()
            if not self._check_headroom(token_timestamp(progress.start), began):
                return  # T0 is already gone: reading on would be wasted
            for i in range(index, len(self._collections)):
                resume = progress if i == index and progress.namespace == names[i] else None
                if not self._scan(self._collections[i], progress.start, resume, began):
                    return
            self.phase = "streaming"
            log.info("bus %s: snapshot read %d documents; streaming from T0", self.name, self.read)
            self._start_stream(Position(resume_after=progress.start))
        except Exception as exc:
            error = self._translate(exc)
            log.error("bus %s: the snapshot failed: %s", self.name, error)
            self._connected(error)
            self._fail(error)

    def _scan(
        self,
        coll: MongoCollection[Any],
        start: Mapping[str, Any],
        resume: SnapshotProgress | None,
        began: float,
    ) -> bool:
        ns = coll.full_name
        db, _, name = ns.partition(".")
        t0 = token_timestamp(start)
        cluster_time = Timestamp(t0.time, 0) if t0 is not None else None
        after, has_after = (resume.after, resume.has_after) if resume is not None else (None, False)
        failures = 0
        while not self._stop.is_set():
            clause = {"_id": {"$gt": after}} if has_after else None
            parts = [q for q in (self._query, clause) if q]
            query = parts[0] if len(parts) == 1 else ({"$and": parts} if parts else {})
            # One cursor read in whole batches (getMore), not one query per batch: each
            # batch is handed on, then the oplog is checked. A cursor that dies (idle
            # timeout behind slow handlers, a network error) reopens after the last _id read.
            try:
                with coll.find_raw_batches(query, sort=[("_id", 1)], batch_size=self._batch_size) as cursor:
                    for data in cursor:
                        for doc in bson.decode_all(data, coll.codec_options):
                            key = doc["_id"]
                            raw = {
                                "_id": progress_token(SnapshotProgress(start, ns, key, True)),
                                "operationType": "snapshot",
                                "ns": {"db": db, "coll": name},
                                "documentKey": {"_id": key},
                                "fullDocument": doc,
                                "clusterTime": cluster_time,
                            }
                            if not self._on_event(raw):
                                return False
                            self.read += 1
                            after, has_after = key, True
                        self._release()
                        failures = 0
                        if self._stop.is_set() or not self._check_headroom(t0, began):
                            return False
                return True
            except (CursorNotFound, ConnectionFailure) as exc:
                self._release()
                failures += 1
                if failures > _CURSOR_RETRIES:
                    raise
                log.warning(
                    "bus %s: the snapshot's cursor on %s failed (%s); reading on after _id %r",
                    self.name,
                    ns,
                    exc,
                    after if has_after else "(start)",
                )
                if self._stop.wait(min(5.0, 0.2 * 2**failures)):
                    return False
        return False

    def _check_headroom(self, t0: Timestamp | None, began: float) -> bool:
        """Say at ERROR when the scan may outrun the oplog; fail when ``T0`` is gone."""
        if t0 is None:
            return True
        self._oplog.refresh(max_age=0.0)  # one small query per batch
        oldest = self._oplog.oldest_ts
        if oldest is None:
            return True
        now = time.monotonic()
        if self._first_oldest is None:
            self._first_oldest = (oldest, now)
        if (oldest.time, oldest.inc) > (t0.time, t0.inc):
            message = (
                f"bus {self.name!r}: the snapshot outran the oplog: its start T0 ({t0}) is older than the oldest "
                f"oplog entry ({oldest}), so changes made during the scan are lost ({self.read} of ~{self.total} "
                f"documents read in {now - began:.0f}s). Make the oplog larger or the snapshot faster "
                "(snapshot_filter, snapshot_batch_size, quicker handlers), then snapshot again"
            )
            if self._raise_on_loss:
                self._fail(ResumeTokenLost(message, key=self._key, since=t0))
                return False
            if not self._lost_said:  # once: every later batch would say it again
                self._lost_said = True
                log.error("%s; going on (on_history_lost='restart_from_now')", message)
            return True
        first, first_at = self._first_oldest
        warning = outrun_warning(
            t0=t0,
            first_oldest=first,
            first_at=first_at,
            oldest=oldest,
            now=now,
            began=began,
            read=self.read,
            total=self.total,
        )
        if warning is not None and (self._warned_at is None or now - self._warned_at > 60.0):
            self._warned_at = now
            log.error("bus %s: %s", self.name, warning)
        return True


#: The oplog's oldest entry must have been watched this long before its pace is trusted
#: (cluster times have whole seconds: a shorter look makes a jump of one second a rate).
MIN_SPAN = 5.0


def outrun_warning(
    *,
    t0: Timestamp,
    first_oldest: Timestamp,
    first_at: float,
    oldest: Timestamp,
    now: float,
    began: float,
    read: int,
    total: int | None,
) -> str | None:
    """Why the scan may outrun the oplog, with the numbers, or ``None``.

    The oplog drops its oldest history at the pace seen since ``first_at`` (monotonic
    seconds, when ``first_oldest`` was its oldest entry); at that pace ``T0`` falls off in
    ``(T0 - oldest) / pace`` seconds. The scan needs about ``(total - read) * elapsed / read``
    more. An oplog that is not full yet, or quiet, drops nothing: no warning.
    """
    span, elapsed = now - first_at, now - began
    dropped = oldest.time - first_oldest.time
    if not total or read <= 0 or elapsed <= 0 or span < MIN_SPAN or span <= 0 or dropped <= 0:
        return None
    pace = dropped / span
    left = max(0, t0.time - oldest.time) / pace
    remaining = max(0, total - read) * elapsed / read
    if remaining <= left:
        return None
    return (
        f"the snapshot may outrun the oplog: about {remaining:.0f}s left to read ({read} of ~{total} documents "
        f"in {elapsed:.0f}s), but the oplog drops {pace:.2f}s of history per second and T0 ({t0}) falls off it "
        f"in about {left:.0f}s (oldest entry now {oldest}). Make the oplog larger or the snapshot faster "
        "(snapshot_filter, snapshot_batch_size, quicker handlers)"
    )


def token_timestamp(token: Any) -> Timestamp | None:
    """The cluster time (seconds and increment) at the start of a resume token's ``_data``."""
    data = token.get("_data") if isinstance(token, Mapping) else None
    if not isinstance(data, str) or len(data) < 18 or not data.startswith("82"):
        return None
    try:
        return Timestamp(int(data[2:10], 16), int(data[10:18], 16))
    except ValueError:
        return None
