"""Multi-document transactions in the fake replica set: enough to commit and to abort an outbox.

A real server keeps a transaction's writes invisible to everyone else until it commits,
and an abort leaves no trace. The fake keeps data in mongomock, which has no snapshots,
so it does this for the writes that need no reading of the transaction's own state:

- ``insert`` inside a transaction is checked (duplicate ``_id`` against the committed
  data and the transaction's own inserts) and buffered: no one sees it, no change
  event exists. ``commitTransaction`` applies the buffer at once, as one step under the
  backend's lock, with the transaction's ``lsid`` / ``txnNumber`` on its change events.
  ``abortTransaction`` (or the end of the session) drops it. This is the transactional
  outbox: insert the business document and the message, then commit or abort.
- Any other write inside the transaction (update, delete, findAndModify), or a read
  while inserts are buffered, applies the buffer and then runs at once, as the fake always
  did: from there on the transaction is visible before it commits, and an abort answers
  263 (``OperationNotSupportedInTransaction``) rather than pretend it rolled back, and logs
  an ERROR, because pymongo's ``abort_transaction()`` ignores every error.
- A write error inside a transaction aborts it: later commands of it, the commit
  included, answer 251 (``NoSuchTransaction``, a ``TransientTransactionError``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import CommandError

__all__ = ["Transactions", "txn_key"]

#: Commands that end a transaction, and ``insert``: every other command inside one is "other".
_ENDS = frozenset({"commitTransaction", "abortTransaction"})
_WRITES = frozenset({"update", "delete", "findAndModify"})

Key = tuple[bytes, int]


def txn_key(body: dict[str, Any]) -> Key | None:
    """The transaction a command belongs to (``lsid`` and ``txnNumber``), or None outside one."""
    if body.get("autocommit") is not False or "lsid" not in body or "txnNumber" not in body:
        return None
    return bytes(body["lsid"]["id"]), int(body["txnNumber"])


class Transactions:
    """Buffered inserts per open transaction (the backend's lock guards every call).

    :param apply: ``apply(session, db, coll, doc)`` inserts one document for real and
        records its oplog entry with ``session`` (``{"lsid", "txnNumber"}``).
    """

    def __init__(self, apply: Callable[[dict[str, Any], str, str, dict[str, Any]], None]) -> None:
        self._apply = apply
        self._buffers: dict[Key, tuple[dict[str, Any], list[tuple[str, str, dict[str, Any]]]]] = {}
        #: Transactions whose writes were applied before commit: they cannot abort.
        self._applied: set[Key] = set()
        #: Transactions a write error aborted: their later commands fail.
        self._aborted: set[Key] = set()

    def buffers(self, key: Key | None) -> bool:
        """Whether an ``insert`` of transaction ``key`` is buffered (not applied now)."""
        return key is not None and key not in self._applied

    def buffered_ids(self, key: Key, db: str, coll: str) -> set[Any]:
        """The ``_id`` values transaction ``key`` inserts into ``db.coll`` so far."""
        entry = self._buffers.get(key)
        if entry is None:
            return set()
        return {doc["_id"] for d, c, doc in entry[1] if d == db and c == coll}

    def buffer(self, key: Key, session: dict[str, Any], db: str, coll: str, doc: dict[str, Any]) -> None:
        self._buffers.setdefault(key, (session, []))[1].append((db, coll, doc))

    def before(self, name: str, key: Key | None) -> None:
        """Run before command ``name``: a write, or a read that must see the buffer, applies it.

        :raises CommandError: 251 when a write error already aborted the transaction.
        """
        if key is None:
            return
        if key in self._aborted and name != "abortTransaction":
            raise CommandError(
                251,
                "NoSuchTransaction",
                f"Transaction with {{ txnNumber: {key[1]} }} has been aborted.",
                ["TransientTransactionError"],
            )
        if name in _ENDS or name == "insert":
            return
        if name in _WRITES or key in self._buffers:
            self._flush(key)
            self._applied.add(key)

    def commit(self, key: Key | None) -> None:
        if key is None:
            return
        self._flush(key)
        self._applied.discard(key)

    def fail(self, key: Key) -> None:
        """A write error: the transaction is aborted, its buffer dropped."""
        self.abort(key)
        self._aborted.add(key)

    def abort(self, key: Key | None) -> bool:
        """Drop the transaction's buffer; False when its writes were already applied."""
        if key is None:
            return True
        self._aborted.discard(key)
        self._buffers.pop(key, None)
        if key in self._applied:
            self._applied.discard(key)
            return False
        return True

    def end_sessions(self, ids: list[bytes]) -> None:
        """Ended sessions abort their open transactions (as a server does)."""
        ended = set(ids)
        for key in [k for k in self._buffers if k[0] in ended]:
            del self._buffers[key]
        self._applied = {k for k in self._applied if k[0] not in ended}
        self._aborted = {k for k in self._aborted if k[0] not in ended}

    def _flush(self, key: Key) -> None:
        entry = self._buffers.pop(key, None)
        if entry is None:
            return
        session, writes = entry
        for db, coll, doc in writes:
            self._apply(session, db, coll, doc)
