"""Change-stream cursors of the fake replica set."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import bson
import mongomock as _mongomock
from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp

from .errors import CommandError
from .oplog import (
    KIND_EVENT,
    KIND_FRAGMENT,
    KIND_HWM,
    KIND_INVALIDATE,
    Entry,
    InvalidToken,
    make_token,
    parse_token,
)

if TYPE_CHECKING:
    from .backend import Backend

# mongomock's partial stubs do not describe what the fake uses; treat it as untyped.
mongomock: Any = _mongomock

__all__ = ["ChangeCursor", "open_change_stream"]

_INTERNAL_DBS = {"admin", "config", "local"}
#: DDL events a stream sees only with ``showExpandedEvents`` (MongoDB 6.0+).
EXPANDED_OPS = frozenset({"create", "createIndexes", "dropIndexes", "modify"})
_FULL_DOCUMENT = ("default", "updateLookup", "whenAvailable", "required")
_BEFORE_CHANGE = ("off", "whenAvailable", "required")


@dataclass
class ChangeCursor:
    """One open change stream: where it is in the oplog and how it renders events."""

    cursor_id: int
    ns: str
    level: str  # "collection" | "database" | "cluster"
    db: str
    coll: str | None
    position: Timestamp
    full_document: str = "default"
    before_change: str = "off"
    expanded: bool = False
    stages: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False
    split: bool = False
    #: Resuming after fragment ``n`` of the event at this time: skip fragments up to ``n``.
    resume_fragment: tuple[Timestamp, int] | None = None

    def matches(self, entry: Entry) -> bool:
        if entry.op in EXPANDED_OPS and not self.expanded:
            return False
        if self.level == "cluster":
            return entry.db not in _INTERNAL_DBS
        if entry.db != self.db:
            return False
        if self.level == "database":
            return not (entry.coll or "").startswith("system.")
        return entry.coll == self.coll or (entry.op == "dropDatabase")

    def render(self, entry: Entry, backend: Backend) -> list[Any]:
        if not self.matches(entry):
            return []
        if entry.op == "insert" and not self.stages and not self.expanded:
            # An insert renders the same for every stream without stages: encode it
            # once, so the fake serves pre-encoded batches (the benchmark needs a
            # server that is not the bottleneck).
            if entry.encoded is None:
                entry.encoded = RawBSONDocument(bson.encode(self._document(entry, backend)))
            limit = backend.max_event_size
            if limit is None or len(entry.encoded.raw) <= limit:
                return [entry.encoded]
        return self._render(entry, backend)

    def _render(self, entry: Entry, backend: Backend) -> list[Any]:
        if self.level == "collection" and entry.op == "dropDatabase":
            # The collection's own drop entry came first and invalidated the stream.
            return []
        doc = self._document(entry, backend)
        op = entry.op
        events = [doc]
        invalidates = (self.level == "collection" and op in ("drop", "rename")) or (
            self.level == "database" and op == "dropDatabase"
        )
        if invalidates:
            events.append(
                {
                    "_id": make_token(entry.ts, KIND_INVALIDATE),
                    "operationType": "invalidate",
                    "clusterTime": entry.ts,
                    "wallTime": entry.wall,
                }
            )
        if self.stages:
            # Invalidations bypass the user's stages here so the client always learns
            # that the stream ended (a real server would close the cursor regardless).
            kept = _apply_stages([e for e in events if e["operationType"] != "invalidate"], self.stages)
            for event in kept:
                if event.get("_id") != make_token(entry.ts, KIND_EVENT):  # the pipeline changed the token
                    raise CommandError(
                        280,
                        "ChangeStreamFatalError",
                        "Encountered an event whose _id field, which contains the resume token, was modified by the pipeline. Modifying the _id field of an event makes it impossible to resume the stream from that point. Only transformations that retain the unmodified _id field are allowed.",
                    )
            events = kept + [e for e in events if e["operationType"] == "invalidate"]
        limit = backend.max_event_size
        if limit is not None:
            events = [piece for e in events for piece in self._fit(e, limit, entry.ts)]
        return events

    def _document(self, entry: Entry, backend: Backend) -> dict[str, Any]:
        """The change event for ``entry`` as this stream's options shape it."""
        doc: dict[str, Any] = {
            "_id": make_token(entry.ts, KIND_EVENT),
            "operationType": entry.op,
            "clusterTime": entry.ts,
            "wallTime": entry.wall,
        }
        op = entry.op
        if self.expanded and entry.uuid is not None:
            doc["collectionUUID"] = entry.uuid
        if op in ("insert", "replace"):
            doc["fullDocument"] = entry.post
        elif op == "update":
            if self.full_document == "updateLookup":
                doc["fullDocument"] = backend.lookup(entry.db, entry.coll or "", entry.document_key or {})
            elif self.full_document in ("whenAvailable", "required"):
                # A post-image exists only where the collection recorded images at the time of the write.
                if not entry.images and self.full_document == "required":
                    raise CommandError(
                        47,
                        "NoMatchingDocument",
                        f"Change stream was configured to require a post-image for all update events, but the post-image was not found for event: {_summary(entry)}",
                    )
                doc["fullDocument"] = entry.post if entry.images else None
        doc["ns"] = {"db": entry.db} if entry.coll is None else {"db": entry.db, "coll": entry.coll}
        if entry.document_key is not None:
            doc["documentKey"] = entry.document_key
        if entry.update_description is not None:
            desc = dict(entry.update_description)
            if not self.expanded:
                desc.pop("disambiguatedPaths", None)
            doc["updateDescription"] = desc
        if entry.to is not None:
            doc["to"] = entry.to
        if self.expanded and entry.description is not None:
            doc["operationDescription"] = entry.description
            if entry.state_before is not None:
                doc["stateBeforeChange"] = entry.state_before
        if self.before_change in ("whenAvailable", "required") and op in ("update", "replace", "delete"):
            if not entry.images and self.before_change == "required":
                raise CommandError(
                    47,
                    "NoMatchingDocument",
                    f"Change stream was configured to require a pre-image for all update, delete and replace events, but the pre-image was not found for event: {_summary(entry)}",
                )
            doc["fullDocumentBeforeChange"] = entry.pre if entry.images else None
        if entry.lsid is not None:
            doc["lsid"] = entry.lsid
            doc["txnNumber"] = entry.txn_number
        return doc

    def _fit(self, event: dict[str, Any], limit: int, ts: Timestamp) -> list[dict[str, Any]]:
        """Check an event against the size limit; split it when ``$changeStreamSplitLargeEvent`` asked."""
        size = len(bson.encode(event))
        if size <= limit:
            return [event]
        if not self.split:
            raise CommandError(
                10334,
                "BSONObjectTooLarge",
                f"BSONObj size: {size} ({size:#x}) is invalid. Size must be between 0 and {limit}",
            )
        fields = [(k, v) for k, v in event.items() if k != "_id"]
        fragments: list[list[tuple[str, Any]]] = [[]]
        used = 200  # room for _id and splitEvent
        for name, value in fields:
            cost = len(bson.encode({name: value}))
            if fragments[-1] and used + cost > limit:
                fragments.append([])
                used = 200
            fragments[-1].append((name, value))
            used += cost
        out = []
        for n, part in enumerate(fragments, start=1):
            out.append(
                {
                    "_id": make_token(ts, KIND_FRAGMENT + n),
                    "splitEvent": {"fragment": n, "of": len(fragments)},
                    **dict(part),
                }
            )
        if self.resume_fragment is not None and self.resume_fragment[0] == ts:
            out = out[self.resume_fragment[1] :]
            self.resume_fragment = None
        return out

    def next_batch(
        self, backend: Backend, batch_size: int | None, wait_ms: int
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Collect up to ``batch_size`` events, waiting up to ``wait_ms`` when there are none.

        Returns the batch and its post-batch resume token. Caller holds no lock.
        """
        limit = batch_size if batch_size and batch_size > 0 else 101
        deadline = time.monotonic() + wait_ms / 1000.0
        oplog = backend.oplog
        batch: list[dict[str, Any]] = []
        with oplog.changed:
            while True:
                if oplog.lost(self.position):
                    raise CommandError(
                        286,
                        "ChangeStreamHistoryLost",
                        "Resume of change stream was not possible, as the resume point may no longer be in the oplog.",
                    )
                while self.pending and len(batch) < limit:
                    batch.append(self.pending.pop(0))
                index = oplog.index_after(self.position)
                entries = oplog.entries
                # Inserts into this stream's own collection, already encoded, go straight into
                # the batch: the client waits for every getMore, so this loop is on its clock.
                direct = self.level == "collection" and not self.stages and not self.expanded
                size_limit = backend.max_event_size if backend.max_event_size is not None else 1 << 62
                while len(batch) < limit and index < len(entries) and not self.closed:
                    entry = entries[index]
                    index += 1
                    self.position = entry.ts
                    encoded = entry.encoded
                    if (
                        direct
                        and encoded is not None
                        and entry.coll == self.coll
                        and entry.db == self.db
                        and len(encoded.raw) <= size_limit
                    ):
                        batch.append(encoded)
                        continue
                    rendered = self.render(entry, backend)
                    for event in rendered:
                        # Pre-encoded inserts are RawBSONDocuments; an invalidation is always a dict.
                        if type(event) is dict and event.get("operationType") == "invalidate":
                            self.closed = True
                    room = limit - len(batch)
                    batch.extend(rendered[:room])
                    self.pending.extend(rendered[room:])
                if batch or self.closed or wait_ms <= 0:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or backend.stopping:
                    break
                oplog.changed.wait(remaining)
            if self.pending or (len(batch) >= limit and index < len(oplog.entries)):
                pbrt = batch[-1]["_id"]
            elif self.closed:
                pbrt = batch[-1]["_id"] if batch else make_token(self.position, KIND_INVALIDATE)
            else:
                idle = oplog.idle_ts()
                if (idle.time, idle.inc) > (self.position.time, self.position.inc):
                    self.position = idle
                pbrt = make_token(self.position, KIND_HWM)
        return batch, pbrt


def _summary(entry: Entry) -> str:
    ns = f'{{db: "{entry.db}", coll: "{entry.coll}"}}' if entry.coll else f'{{db: "{entry.db}"}}'
    return (
        f'{{operationType: "{entry.op}", ns: {ns}, clusterTime: Timestamp({entry.ts.time}, {entry.ts.inc})}}'
    )


def _apply_stages(events: list[dict[str, Any]], stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    try:
        # mongomock changes documents in place; the events share their documents with the oplog.
        return list(mongomock.aggregate.process_pipeline(copy.deepcopy(events), None, stages, None))
    except (NotImplementedError, mongomock.OperationFailure, TypeError, KeyError, ValueError) as exc:
        raise CommandError(40324, "Location40324", f"invalid change stream pipeline: {exc}") from exc


def _normalize_stages(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rewrite the stages mongomock gets wrong into equivalents it gets right (MongoDB's semantics).

    ``$project`` with computed or nested fields becomes ``$addFields`` then an
    inclusion ``$project`` (so ``"ns.viewOn": <expr>`` nests, as on a server);
    ``$unset`` becomes an exclusion ``$project``; ``$replaceWith`` becomes ``$replaceRoot``.
    """
    out: list[dict[str, Any]] = []
    for stage in stages:
        ((name, spec),) = stage.items()
        if name == "$unset":
            fields = [spec] if isinstance(spec, str) else list(spec)
            out.append({"$project": dict.fromkeys(fields, 0)})
        elif name == "$replaceWith":
            out.append({"$replaceRoot": {"newRoot": spec}})
        elif name == "$project" and isinstance(spec, dict):
            flat = _flatten_projection(spec)
            computed = {k: v for k, v in flat.items() if not _is_flag(v)}
            if computed:
                out.append({"$addFields": computed})
                out.append(
                    {
                        "$project": {
                            **{k: int(bool(v)) for k, v in flat.items() if _is_flag(v)},
                            **dict.fromkeys(computed, 1),
                        }
                    }
                )
            else:
                out.append({"$project": {k: int(bool(v)) for k, v in flat.items()}})
        else:
            out.append(stage)
    return out


def _is_flag(value: Any) -> bool:
    # In $project any number or boolean includes (non-zero) or excludes (zero) a field.
    return isinstance(value, (bool, int, float))


def _flatten_projection(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"ns": {"coll": 1}}`` -> ``{"ns.coll": 1}``; an operator document (``{"$concat": ...}``) is a value."""
    flat: dict[str, Any] = {}
    for key, value in spec.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not any(k.startswith("$") for k in value):
            flat.update(_flatten_projection(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def open_change_stream(
    backend: Backend, cursor_id: int, db: str, coll: str | None, pipeline: list[dict[str, Any]]
) -> ChangeCursor:
    """Build a cursor from an ``aggregate`` whose first stage is ``$changeStream``."""
    spec = pipeline[0]["$changeStream"]
    if backend.standalone:
        raise CommandError(
            40573, "Location40573", "The $changeStream stage is only supported on replica sets"
        )
    if spec.get("allChangesForCluster"):
        if db != "admin" or coll is not None:
            raise CommandError(
                2, "BadValue", "allChangesForCluster requires aggregate: 1 on the admin database"
            )
        level = "cluster"
    elif coll is None:
        if db == "admin":
            raise CommandError(
                73, "InvalidNamespace", "$changeStream on the admin database requires allChangesForCluster"
            )
        level = "database"
    else:
        level = "collection"
    for stage in pipeline[1:]:
        (name,) = stage.keys()
        if name in ("$changeStream", "$out", "$merge", "$lookup", "$group", "$sort", "$facet"):
            raise CommandError(40324, "Location40324", f"{name} is not permitted in a $changeStream pipeline")
        if name == "$changeStreamSplitLargeEvent" and stage is not pipeline[-1]:
            raise CommandError(
                7182802,
                "Location7182802",
                "$changeStreamSplitLargeEvent must be the last stage in the pipeline",
            )
        if name == "$changeStreamSplitLargeEvent" and not backend.supports_split:
            raise CommandError(
                40324, "Location40324", "Unrecognized pipeline stage name: '$changeStreamSplitLargeEvent'"
            )
        if name not in (
            "$match",
            "$project",
            "$addFields",
            "$set",
            "$unset",
            "$replaceRoot",
            "$replaceWith",
            "$redact",
            "$changeStreamSplitLargeEvent",
        ):
            raise CommandError(40324, "Location40324", f"Unrecognized pipeline stage name: '{name}'")
    if spec.get("fullDocument", "default") not in _FULL_DOCUMENT:
        raise CommandError(
            2,
            "BadValue",
            f"Enumeration value '{spec.get('fullDocument')}' for field '$changeStream.fullDocument' is not a valid value.",
        )
    if spec.get("fullDocumentBeforeChange", "off") not in _BEFORE_CHANGE:
        raise CommandError(
            2,
            "BadValue",
            f"Enumeration value '{spec.get('fullDocumentBeforeChange')}' for field '$changeStream.fullDocumentBeforeChange' is not a valid value.",
        )
    oplog = backend.oplog
    with oplog.changed:
        token = spec.get("resumeAfter")
        start_after = spec.get("startAfter")
        at_time = spec.get("startAtOperationTime")
        if sum(x is not None for x in (token, start_after, at_time)) > 1:
            raise CommandError(
                40674, "Location40674", "Only one type of resume option is allowed, but multiple were found."
            )
        if token is not None or start_after is not None:
            try:
                ts, kind = parse_token(token if token is not None else start_after)
            except InvalidToken as exc:
                raise CommandError(260, "InvalidResumeToken", str(exc)) from exc
            resume_fragment = None
            if kind > KIND_FRAGMENT:  # the middle of a split event: re-render it, skip what was read
                resume_fragment = (ts, kind - KIND_FRAGMENT)
                ts = Timestamp(ts.time, ts.inc - 1) if ts.inc > 0 else Timestamp(ts.time - 1, 2**32 - 1)
            if kind == KIND_INVALIDATE and token is not None:
                raise CommandError(
                    260,
                    "InvalidResumeToken",
                    "Attempting to resume a change stream using 'resumeAfter' is not allowed from an invalidate notification.",
                )
            if oplog.lost(ts):
                raise CommandError(
                    286,
                    "ChangeStreamHistoryLost",
                    "Resume of change stream was not possible, as the resume point may no longer be in the oplog.",
                )
            position = ts
        elif at_time is not None:
            resume_fragment = None
            if not isinstance(at_time, Timestamp):
                raise CommandError(14, "TypeMismatch", "startAtOperationTime must be a timestamp")
            position = (
                Timestamp(at_time.time, at_time.inc - 1)
                if at_time.inc > 0
                else Timestamp(at_time.time - 1, 2**32 - 1)
            )
            if oplog.lost(position):
                raise CommandError(
                    286,
                    "ChangeStreamHistoryLost",
                    "Resume of change stream was not possible, as the resume point may no longer be in the oplog.",
                )
        else:
            resume_fragment = None
            position = oplog.last
    return ChangeCursor(
        cursor_id=cursor_id,
        ns=f"{db}.{coll}" if coll is not None else f"{db}.$cmd.aggregate",
        level=level,
        db=db,
        coll=coll,
        position=position,
        full_document=spec.get("fullDocument", "default"),
        before_change=spec.get("fullDocumentBeforeChange", "off"),
        expanded=bool(spec.get("showExpandedEvents", False)),
        stages=_normalize_stages([s for s in pipeline[1:] if "$changeStreamSplitLargeEvent" not in s]),
        split=any("$changeStreamSplitLargeEvent" in s for s in pipeline[1:]),
        resume_fragment=resume_fragment,
    )
