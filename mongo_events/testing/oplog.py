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


def update_description(
    before: dict[str, Any], after: dict[str, Any], expanded: bool = False
) -> dict[str, Any]:
    """Compute ``updateDescription`` from the document before and after a write."""
    updated: dict[str, Any] = {}
    removed: list[str] = []
    truncated: list[dict[str, Any]] = []
    ambiguous: dict[str, list[Any]] = {}

    def walk(old: dict[str, Any], new: dict[str, Any], path: list[Any]) -> None:
        for name, value in new.items():
            sub = [*path, name]
            if name not in old:
                _set(sub, value)
            elif old[name] != value or type(old[name]) is not type(value):
                prev = old[name]
                if isinstance(prev, dict) and isinstance(value, dict):
                    walk(prev, value, sub)
                elif isinstance(prev, list) and isinstance(value, list):
                    walk_list(prev, value, sub)
                else:
                    _set(sub, value)
        for name in old:
            if name not in new:
                sub = [*path, name]
                removed.append(_dotted(sub))
                _note_ambiguous(sub)

    def walk_list(old: list[Any], new: list[Any], path: list[Any]) -> None:
        common = min(len(old), len(new))
        if len(new) < len(old) and new == old[:common]:
            truncated.append({"field": _dotted(path), "newSize": len(new)})
            return
        if new[:common] != old[:common] and len(new) != len(old):
            _set(path, new)
            return
        for i in range(common):
            if old[i] != new[i]:
                _set([*path, i], new[i])
        for i in range(common, len(new)):
            _set([*path, i], new[i])
        if len(new) < len(old):
            truncated.append({"field": _dotted(path), "newSize": len(new)})

    def _set(path: list[Any], value: Any) -> None:
        updated[_dotted(path)] = value
        _note_ambiguous(path)

    def _note_ambiguous(path: list[Any]) -> None:
        if any(isinstance(p, str) and (p.isdigit() or "." in p) for p in path):
            ambiguous[_dotted(path)] = list(path)

    walk(before, after, [])
    desc: dict[str, Any] = {
        "updatedFields": updated,
        "removedFields": removed,
        "truncatedArrays": truncated,
    }
    if expanded:
        desc["disambiguatedPaths"] = ambiguous
    return desc


def _dotted(path: list[Any]) -> str:
    return ".".join(str(p) for p in path)
