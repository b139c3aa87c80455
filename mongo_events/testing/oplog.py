"""The fake replica set's oplog: entries, resume tokens and change events.

Every write appends one :class:`Entry` with a strictly increasing cluster time.
Change streams render entries into change documents shaped as MongoDB's
change-events reference describes them.
"""

from __future__ import annotations

import datetime
import re
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

from bson.timestamp import Timestamp

__all__ = [
    "KIND_EVENT",
    "KIND_HWM",
    "KIND_INVALIDATE",
    "KIND_FRAGMENT",
    "Entry",
    "InvalidToken",
    "Oplog",
    "make_token",
    "parse_token",
    "update_description",
]

KIND_HWM = 0
KIND_EVENT = 1
KIND_INVALIDATE = 2
#: Fragment ``n`` of a split event has kind ``KIND_FRAGMENT + n``.
KIND_FRAGMENT = 0x10

_TOKEN_RE = re.compile(r"^82([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{2})$")


class InvalidToken(ValueError):
    """A resume token the fake did not issue."""


def make_token(ts: Timestamp, kind: int) -> dict[str, str]:
    """An opaque resume token that sorts like MongoDB's (time first)."""
    return {"_data": f"82{ts.time:08X}{ts.inc:08X}{kind:02X}"}


def parse_token(token: Any) -> tuple[Timestamp, int]:
    """Return ``(cluster time, kind)`` of a token this fake issued."""
    data = token.get("_data") if isinstance(token, dict) else None
    match = _TOKEN_RE.match(data) if isinstance(data, str) else None
    if match is None:
        raise InvalidToken(f"malformed resume token: {token!r}")
    return Timestamp(int(match[1], 16), int(match[2], 16)), int(match[3], 16)


def _key(ts: Timestamp) -> tuple[int, int]:
    return (ts.time, ts.inc)


@dataclass
class Entry:
    """One oplog entry, holding what every change-stream option needs."""

    ts: Timestamp
    wall: datetime.datetime
    op: str
    db: str
    coll: str | None = None
    document_key: dict[str, Any] | None = None
    post: dict[str, Any] | None = None
    pre: dict[str, Any] | None = None
    update_description: dict[str, Any] | None = None
    to: dict[str, str] | None = None
    lsid: dict[str, Any] | None = None
    txn_number: int | None = None
    #: The collection's UUID (``collectionUUID`` of expanded events), a BSON binary of subtype 4.
    uuid: Any = None
    #: ``operationDescription`` of DDL events (create, createIndexes, dropIndexes, modify, rename).
    description: dict[str, Any] | None = None
    #: ``stateBeforeChange`` of a ``modify`` event.
    state_before: dict[str, Any] | None = None
    #: True when the collection recorded pre- and post-images (``changeStreamPreAndPostImages``) at this write.
    images: bool | None = None
    #: The change event of an insert, encoded once and served to every stream
    #: that has no pipeline stages (see ``ChangeCursor.render``).
    encoded: Any = field(default=None, repr=False, compare=False)

    def to_doc(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "encoded"}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Entry:
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


@dataclass
class Oplog:
    """A bounded, ordered log of entries with a monotonic cluster clock."""

    max_entries: int = 100_000
    entries: list[Entry] = field(default_factory=list)
    keys: list[tuple[int, int]] = field(default_factory=list)
    #: Cluster time of the newest entry that has been trimmed away.
    trimmed_upto: Timestamp | None = None
    last: Timestamp = field(default_factory=lambda: Timestamp(0, 0))
    changed: threading.Condition = field(default_factory=threading.Condition)

    def next_ts(self) -> Timestamp:
        now = int(time.time())
        if now > self.last.time:
            self.last = Timestamp(now, 1)
        else:
            self.last = Timestamp(self.last.time, self.last.inc + 1)
        return self.last

    def idle_ts(self) -> Timestamp:
        """The current cluster time for a high-water mark: no future write is at or before it."""
        now = int(time.time())
        return Timestamp(now, 0) if now > self.last.time else self.last

    def append(self, entry: Entry) -> None:
        self.entries.append(entry)
        self.keys.append(_key(entry.ts))
        self.last = max(self.last, entry.ts)
        excess = len(self.entries) - self.max_entries
        if excess > 0:
            self.trimmed_upto = self.entries[excess - 1].ts
            del self.entries[:excess]
            del self.keys[:excess]

    def index_after(self, ts: Timestamp) -> int:
        """Index of the first entry strictly after ``ts``."""
        return bisect_right(self.keys, _key(ts))

    def lost(self, ts: Timestamp) -> bool:
        """True when entries after ``ts`` have been trimmed away."""
        return self.trimmed_upto is not None and _key(ts) < _key(self.trimmed_upto)


#: Update operators whose paths name exactly what changed; the array operators are diffed below their path.
_SET_OPERATORS = frozenset(
    {"$set", "$unset", "$inc", "$mul", "$min", "$max", "$currentDate", "$bit", "$rename"}
)
_ARRAY_OPERATORS = frozenset({"$push", "$addToSet", "$pull", "$pullAll", "$pop"})
_STRICT_NUMBER = re.compile(r"^(0|[1-9][0-9]*)$")
_MISSING = object()


def update_description(
    before: dict[str, Any], after: dict[str, Any], update: Any = None, expanded: bool = False
) -> dict[str, Any]:
    """Compute ``updateDescription`` as MongoDB does for an update from ``before`` to ``after``.

    An operator update (``{"$set": ...}``) reports the paths it names, exactly
    (``$set {"a.0.1": 2}`` gives ``updatedFields {"a.0.1": 2}``); an array
    operator reports the whole array, or the appended elements of a plain
    ``$push``. A pipeline update reports the difference of the documents,
    element by element through arrays, with ``truncatedArrays`` where an array
    shrank (only pipeline updates report truncations, as on the server).
    ``disambiguatedPaths`` (expanded events) maps each path that has a dotted or
    a numeric field name to its components, array indexes as integers.
    """
    diff = _Diff()
    if isinstance(update, dict) and update and all(k.startswith("$") for k in update):
        for operator, spec in update.items():
            if not isinstance(spec, dict) or operator == "$setOnInsert":
                continue
            for path, arg in spec.items():
                targets = [path, arg] if operator == "$rename" and isinstance(arg, str) else [path]
                for target in targets:
                    parts = target.split(".")
                    positional = next((i for i, p in enumerate(parts) if p.startswith("$")), None)
                    if positional is not None:  # "a.$.b", "a.$[].b": the server logs below the array
                        diff.subtree(before, after, _resolve(before, after, parts[:positional]))
                    elif operator in _ARRAY_OPERATORS:
                        diff.array_operator(before, after, _resolve(before, after, parts))
                    elif operator in _SET_OPERATORS:
                        diff.exact(before, after, _resolve(before, after, parts))
    else:
        diff.walk(before, after, [])
    desc: dict[str, Any] = {
        "updatedFields": {_dotted(p): v for p, v in diff.updated},
        "removedFields": [_dotted(p) for p in diff.removed],
        "truncatedArrays": [{"field": _dotted(p), "newSize": n} for p, n in diff.truncated],
    }
    if expanded:
        paths = [p for p, _ in diff.updated] + diff.removed + [p for p, _ in diff.truncated]
        desc["disambiguatedPaths"] = {_dotted(p): list(p) for p in paths if _ambiguous(p)}
    return desc


class _Diff:
    def __init__(self) -> None:
        self.updated: list[tuple[list[Any], Any]] = []
        self.removed: list[list[Any]] = []
        self.truncated: list[tuple[list[Any], int]] = []

    def exact(self, before: Any, after: Any, path: list[Any]) -> None:
        old, new = _get(before, path), _get(after, path)
        if new is _MISSING:
            if old is not _MISSING:
                self.removed.append(path)
        elif old is _MISSING or old != new or type(old) is not type(new):
            self.updated.append((path, new))

    def array_operator(self, before: Any, after: Any, path: list[Any]) -> None:
        """``$push`` that only appends logs each new element by index; the array operators otherwise log the array."""
        old, new = _get(before, path), _get(after, path)
        if isinstance(old, list) and isinstance(new, list) and len(new) > len(old) and new[: len(old)] == old:
            self.updated.extend(([*path, i], new[i]) for i in range(len(old), len(new)))
        else:
            self.exact(before, after, path)

    def subtree(self, before: Any, after: Any, path: list[Any]) -> None:
        old, new = _get(before, path), _get(after, path)
        if isinstance(old, dict) and isinstance(new, dict):
            self.walk(old, new, path)
        elif isinstance(old, list) and isinstance(new, list):
            self.walk_list(old, new, path)
        else:
            self.exact(before, after, path)

    def walk(self, old: dict[str, Any], new: dict[str, Any], path: list[Any]) -> None:
        for name, value in new.items():
            sub = [*path, name]
            if name not in old:
                self.updated.append((sub, value))
            elif old[name] != value or type(old[name]) is not type(value):
                self._changed(old[name], value, sub)
        for name in old:
            if name not in new:
                self.removed.append([*path, name])

    def walk_list(self, old: list[Any], new: list[Any], path: list[Any]) -> None:
        # As the server's array diff: changed elements by index (recursing into documents
        # and arrays), appended ones by index, and a resize when the array shrank.
        if len(new) < len(old):
            self.truncated.append((path, len(new)))
        for i, value in enumerate(new):
            sub = [*path, i]
            if i >= len(old):
                self.updated.append((sub, value))
            elif old[i] != value or type(old[i]) is not type(value):
                self._changed(old[i], value, sub)

    def _changed(self, old: Any, new: Any, path: list[Any]) -> None:
        if isinstance(old, dict) and isinstance(new, dict):
            self.walk(old, new, path)
        elif isinstance(old, list) and isinstance(new, list):
            self.walk_list(old, new, path)
        else:
            self.updated.append((path, new))


def _resolve(before: Any, after: Any, parts: list[str]) -> list[Any]:
    """Path components with array indexes as integers, read from the document after (else before) the write."""
    out: list[Any] = []
    cur: Any = after
    alt: Any = before
    for part in parts:
        node = cur if cur is not _MISSING else alt
        if isinstance(node, list) and _STRICT_NUMBER.match(part):
            out.append(int(part))
        else:
            out.append(part)
        cur = _step(cur, out[-1])
        alt = _step(alt, out[-1])
    return out


def _step(node: Any, key: Any) -> Any:
    if isinstance(key, int) and isinstance(node, list):
        return node[key] if key < len(node) else _MISSING
    if isinstance(node, dict):
        return node.get(key, _MISSING)
    return _MISSING


def _get(doc: Any, path: list[Any]) -> Any:
    for key in path:
        doc = _step(doc, key)
        if doc is _MISSING:
            break
    return doc


def _ambiguous(path: list[Any]) -> bool:
    # A top-level numeric name is not ambiguous (a document's top level is never an array).
    return any(
        isinstance(p, str) and ("." in p or (i > 0 and _STRICT_NUMBER.match(p) is not None))
        for i, p in enumerate(path)
    )


def _dotted(path: list[Any]) -> str:
    return ".".join(str(p) for p in path)
