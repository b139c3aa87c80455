"""The MongoDB message store of the durable queue (Go's ``persistent.Store``, without its checkpoint).

A message is one document. Its lifecycle is Go's: ``pending`` -> ``inflight``
(claimed atomically, with ``inflight_at``) -> ``acked``. A nack puts it back to
``pending`` with ``retry_count + 1``; an in-flight message whose ``inflight_at`` is
older than the visibility timeout is claimable again. Consumers find work *by
status* only: there is no position cursor, so a message nacked (or left in flight)
before a later one was acked is always found again (Go's checkpoint could pass it).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
import pymongo
from bson import ObjectId
from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from ..errors import ConfigurationError, StoreError

__all__ = ["MessageStore", "QueueStats", "StoredMessage"]

PENDING = "pending"
INFLIGHT = "inflight"
ACKED = "acked"


@attrs.frozen
class StoredMessage:
    """One claimed message.

    :ivar id: the sequence id (the ``_id`` ObjectId's hex string).
    :ivar event: the event name it was published under.
    :ivar payload: the published payload (a document).
    :ivar key: the ordering key given to ``publish``, or ``None``.
    :ivar headers: the headers given to ``publish`` (empty when none).
    :ivar timestamp: when it was published.
    :ivar retry_count: how many times it was nacked.
    """

    id: str
    event: str
    payload: Mapping[str, Any]
    key: str | None
    headers: Mapping[str, Any]
    timestamp: datetime
    retry_count: int


@attrs.frozen
class QueueStats:
    """Message counts by status (Go's ``Stats``)."""

    pending: int = 0
    inflight: int = 0
    acked: int = 0
    total: int = 0


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _oid(message_id: str | ObjectId) -> ObjectId:
    if isinstance(message_id, ObjectId):
        return message_id
    try:
        return ObjectId(message_id)
    except Exception as exc:
        raise ConfigurationError(f"invalid sequence id {message_id!r}: not an ObjectId hex string") from exc


class MessageStore:
    """The queue's messages in one MongoDB collection.

    :param collection: the ``pymongo`` collection holding the messages.
    :param visibility_timeout: seconds after which an in-flight message that was
        neither acked nor nacked (nor touched by its holder) is claimable again.
    :param ttl: when set, acked messages are deleted by MongoDB this many seconds
        after ``acked_at`` (a TTL index, created by :meth:`ensure_indexes`).
    """

    def __init__(
        self, collection: Collection[Any], *, visibility_timeout: float = 300.0, ttl: float | None = None
    ) -> None:
        if collection is None:
            raise ConfigurationError("MessageStore needs a collection")
        if (
            isinstance(visibility_timeout, bool)
            or not isinstance(visibility_timeout, (int, float))
            or visibility_timeout <= 0
        ):
            raise ConfigurationError(
                f"visibility_timeout must be a positive number of seconds, got {visibility_timeout!r}"
            )
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0):
            raise ConfigurationError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        self.collection = collection
        self.visibility_timeout = float(visibility_timeout)
        self.ttl = ttl

    # -- set-up ------------------------------------------------------------

    def ensure_indexes(self) -> None:
        """Create Go's indexes (plus one for keyed order); idempotent."""
        indexes = [
            pymongo.IndexModel([("event_name", 1), ("status", 1), ("timestamp", 1)]),
            pymongo.IndexModel([("event_name", 1), ("_id", 1)]),
            pymongo.IndexModel([("status", 1), ("inflight_at", 1)]),
            pymongo.IndexModel([("event_name", 1), ("key", 1), ("_id", 1)]),
        ]
        if self.ttl:
            indexes.append(
                pymongo.IndexModel(
                    [("acked_at", 1)],
                    expireAfterSeconds=int(self.ttl),
                    partialFilterExpression={"status": ACKED},
                    name="acked_at_ttl",
                )
            )
        try:
            self.collection.create_indexes(indexes)
        except PyMongoError as exc:
            raise StoreError(f"create queue indexes: {exc}") from exc

    # -- publishing ------------------------------------------------------------

    @staticmethod
    def _document(
        event: str, payload: Mapping[str, Any], key: str | None, headers: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        if not isinstance(event, str) or not event:
            raise ConfigurationError(f"event must be a non-empty str, got {event!r}")
        if not isinstance(payload, Mapping):
            raise ConfigurationError(f"payload must be a mapping (a document), got {type(payload).__name__}")
        if key is not None and not isinstance(key, str):
            raise ConfigurationError(f"key must be a str or None, got {key!r}")
        doc: dict[str, Any] = {
            "_id": ObjectId(),
            "event_name": event,
            "data": dict(payload),
            "status": PENDING,
            "timestamp": _now(),
            "retry_count": 0,
        }
        if key is not None:
            doc["key"] = key
        if headers:
            doc["headers"] = dict(headers)
        return doc

    def append(
        self,
        event: str,
        payload: Mapping[str, Any],
        *,
        key: str | None = None,
        headers: Mapping[str, Any] | None = None,
        session: Any = None,
    ) -> str:
        """Insert one pending message; returns its sequence id. Raises :class:`StoreError` if not stored."""
        doc = self._document(event, payload, key, headers)
        try:
            self.collection.insert_one(doc, session=session)
        except PyMongoError as exc:
            raise StoreError(f"append message: {exc}") from exc
        return str(doc["_id"])

    def append_many(
        self,
        messages: Iterable[tuple[str, Mapping[str, Any], str | None, Mapping[str, Any] | None]],
        *,
        session: Any = None,
    ) -> list[str]:
        """Insert ``(event, payload, key, headers)`` messages in one round trip, in order."""
        docs = [self._document(e, p, k, h) for e, p, k, h in messages]
        if not docs:
            return []
        try:
            self.collection.insert_many(docs, ordered=True, session=session)
        except PyMongoError as exc:
            raise StoreError(f"append messages: {exc}") from exc
        return [str(d["_id"]) for d in docs]

    # -- consuming ---------------------------------------------------------------

    def _claimable(self, event: str, now: datetime) -> dict[str, Any]:
        expired = now - timedelta(seconds=self.visibility_timeout)
        return {
            "event_name": event,
            "$or": [{"status": PENDING}, {"status": INFLIGHT, "inflight_at": {"$lt": expired}}],
        }

    def claim(
        self, event: str, *, owner: str = "", limit: int = 1, ordered: bool = False
    ) -> list[StoredMessage]:
        """Claim up to ``limit`` claimable messages of ``event``, oldest first.

        Claimable: pending, or in flight past the visibility timeout. With
        ``ordered``, a keyed message is claimable only when no earlier message of its
        key is pending or in flight, so one key's messages run one at a time, in
        order, across every consumer. Each claim is atomic: two consumers never
        both get a message (until its visibility timeout expires).
        """
        now = _now()
        filt = self._claimable(event, now)
        try:
            if limit == 1 and not ordered:  # Go's Fetch: one find_one_and_update
                doc = self.collection.find_one_and_update(
                    filt,
                    {"$set": {"status": INFLIGHT, "inflight_at": now, "owner": owner}},
                    sort=[("timestamp", 1), ("_id", 1)],
                    return_document=pymongo.ReturnDocument.AFTER,
                )
                return [] if doc is None else [self._message(doc)]
            candidates = list(
                self.collection.find(filt, {"_id": 1, "key": 1}, sort=[("_id", 1)], limit=limit)
            )
            if ordered:
                candidates = self._heads(event, candidates)
            if not candidates:
                return []
            ids = [c["_id"] for c in candidates]
            token = f"{owner}:{uuid.uuid4().hex}"
            self.collection.update_many(
                {**filt, "_id": {"$in": ids}},
                {"$set": {"status": INFLIGHT, "inflight_at": now, "owner": owner, "claim": token}},
            )
            docs = self.collection.find(
                {"_id": {"$in": ids}, "claim": token, "status": INFLIGHT}, sort=[("_id", 1)]
            )
            return [self._message(d) for d in docs]
        except PyMongoError as exc:
            raise StoreError(f"claim messages of {event!r}: {exc}") from exc

    def _heads(self, event: str, candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The candidates that are the earliest unacked message of their key (or have no key)."""
        keys = sorted({c["key"] for c in candidates if c.get("key") is not None})
        if not keys:
            return candidates
        heads: dict[str, ObjectId] = {}
        cursor = self.collection.find(
            {"event_name": event, "key": {"$in": keys}, "status": {"$in": [PENDING, INFLIGHT]}},
            {"_id": 1, "key": 1},
            sort=[("_id", 1)],
        )
        for doc in cursor:
            heads.setdefault(doc["key"], doc["_id"])
            if len(heads) == len(keys):
                break
        return [c for c in candidates if c.get("key") is None or heads.get(c["key"]) == c["_id"]]

    @staticmethod
    def _message(doc: Mapping[str, Any]) -> StoredMessage:
        timestamp = doc.get("timestamp")
        if isinstance(timestamp, datetime) and timestamp.tzinfo is None:
            timestamp = timestamp.replace(tzinfo=timezone.utc)
        return StoredMessage(
            id=str(doc["_id"]),
            event=doc["event_name"],
            payload=doc.get("data") or {},
            key=doc.get("key"),
            headers=doc.get("headers") or {},
            timestamp=timestamp if isinstance(timestamp, datetime) else _now(),
            retry_count=int(doc.get("retry_count") or 0),
        )

    def ack(self, event: str, message_ids: str | Sequence[str]) -> int:
        """Mark messages acked (``acked_at`` = now); returns how many matched."""
        ids = [_oid(m) for m in ([message_ids] if isinstance(message_ids, str) else message_ids)]
        if not ids:
            return 0
        try:
            result = self.collection.update_many(
                {"_id": {"$in": ids}, "event_name": event},
                {
                    "$set": {"status": ACKED, "acked_at": _now()},
                    "$unset": {"inflight_at": "", "owner": "", "claim": ""},
                },
            )
        except PyMongoError as exc:
            raise StoreError(f"ack messages of {event!r}: {exc}") from exc
        return int(result.matched_count)

    def nack(self, event: str, message_id: str) -> bool:
        """Return an in-flight message to pending with ``retry_count + 1``; False when none matched."""
        try:
            result = self.collection.update_one(
                {"_id": _oid(message_id), "event_name": event, "status": INFLIGHT},
                {
                    "$set": {"status": PENDING},
                    "$inc": {"retry_count": 1},
                    "$unset": {"inflight_at": "", "owner": "", "claim": ""},
                },
            )
        except PyMongoError as exc:
            raise StoreError(f"nack message {message_id} of {event!r}: {exc}") from exc
        return result.matched_count > 0

    def release(self, event: str, message_ids: Sequence[str], *, owner: str) -> int:
        """Return ``owner``'s in-flight messages to pending unchanged (never started: no retry counted)."""
        if not message_ids:
            return 0
        try:
            result = self.collection.update_many(
                {
                    "_id": {"$in": [_oid(m) for m in message_ids]},
                    "event_name": event,
                    "status": INFLIGHT,
                    "owner": owner,
                },
                {"$set": {"status": PENDING}, "$unset": {"inflight_at": "", "owner": "", "claim": ""}},
            )
        except PyMongoError as exc:
            raise StoreError(f"release messages of {event!r}: {exc}") from exc
        return int(result.matched_count)

    def touch(self, message_ids: Sequence[str], *, owner: str) -> int:
        """Renew the visibility of ``owner``'s in-flight messages (``inflight_at`` = now)."""
        if not message_ids:
            return 0
        try:
            result = self.collection.update_many(
                {"_id": {"$in": [_oid(m) for m in message_ids]}, "status": INFLIGHT, "owner": owner},
                {"$set": {"inflight_at": _now()}},
            )
        except PyMongoError as exc:
            raise StoreError(f"renew in-flight messages: {exc}") from exc
        return int(result.matched_count)

    # -- inspection and cleanup ----------------------------------------------------

    def stats(self, event: str | None = None) -> QueueStats:
        """Counts by status, for one event or (``None``) all of them."""
        pipeline: list[dict[str, Any]] = []
        if event:
            pipeline.append({"$match": {"event_name": event}})
        pipeline.append({"$group": {"_id": "$status", "count": {"$sum": 1}}})
        try:
            counts = {d["_id"]: int(d["count"]) for d in self.collection.aggregate(pipeline)}
        except PyMongoError as exc:
            raise StoreError(f"queue stats: {exc}") from exc
        return QueueStats(
            pending=counts.get(PENDING, 0),
            inflight=counts.get(INFLIGHT, 0),
            acked=counts.get(ACKED, 0),
            total=sum(counts.values()),
        )

    def purge(self, older_than: float | timedelta) -> int:
        """Delete messages acked more than ``older_than`` (seconds or a timedelta) ago; returns the count."""
        age = older_than if isinstance(older_than, timedelta) else timedelta(seconds=older_than)
        try:
            result = self.collection.delete_many({"status": ACKED, "acked_at": {"$lt": _now() - age}})
        except PyMongoError as exc:
            raise StoreError(f"purge acked messages: {exc}") from exc
        return int(result.deleted_count)
