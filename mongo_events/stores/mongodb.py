"""MongoDB stores: resume tokens (the seed's ``_event_resume_tokens``), acks and dead letters."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import bson
from bson import ObjectId, json_util
from bson.binary import Binary
from bson.timestamp import Timestamp
from pymongo import IndexModel, ReturnDocument, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from ..errors import StoreError
from .base import AckStore, Checkpoint, DeadLetterStore, ResumeTokenStore, stored_checkpoint
from .records import AckFilter, AckRecord, AckStatus, DeadLetter, DeadLetterFilter

__all__ = ["MongoResumeTokenStore", "MongoAckStore", "MongoDeadLetterStore", "DEFAULT_COLLECTION"]

DEFAULT_COLLECTION = "_event_resume_tokens"


class MongoResumeTokenStore(ResumeTokenStore):
    """Documents ``{_id: key, token, cluster_time, namespace, level, updated_at}`` with an index on
    ``updated_at``; documents of the Go library's shape (``{_id, token, updated_at}``) load too.
    While an initial snapshot is unfinished, ``token`` is its start ``T0`` and a ``snapshot``
    field beside it holds the progress (``{t0, ns, after}``).

    :param collection: by default the bus uses ``_event_resume_tokens`` in the watched
        database (``admin`` for a cluster watch).

    .. versionadded:: 0.1.0
    """

    def __init__(self, collection: Collection[Any]) -> None:
        if collection is None:
            raise TypeError("MongoResumeTokenStore needs a pymongo Collection")
        self.collection = collection

    def load(self, key: str) -> Checkpoint | None:
        try:
            doc = self.collection.find_one({"_id": key})
        except PyMongoError as exc:
            raise StoreError(
                f"could not load resume token {key!r} from {self.collection.full_name}: {exc}"
            ) from exc
        if doc is None:
            return None
        return stored_checkpoint(doc, key, self.collection.full_name)

    def save(
        self,
        key: str,
        token: Mapping[str, Any],
        cluster_time: Timestamp | None = None,
        *,
        namespace: str | None = None,
        level: str | None = None,
    ) -> None:
        update = self.update_for(token, cluster_time, namespace=namespace, level=level)
        try:
            self.collection.update_one({"_id": key}, update, upsert=True)
        except PyMongoError as exc:
            raise StoreError(
                f"could not save resume token {key!r} to {self.collection.full_name}: {exc}"
            ) from exc

    @staticmethod
    def update_for(
        token: Mapping[str, Any],
        cluster_time: Timestamp | None = None,
        *,
        namespace: str | None = None,
        level: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """The update that stores a checkpoint in this store's shape, with ``extra`` fields set
        too (a writer stamp, a fence): every writer of this collection builds it here, so
        snapshot progress always goes beside the token, never inside it.

        .. versionadded:: 0.2.0
        """
        from ..snapshot import stored_fields

        stored, snapshot = stored_fields(token)  # snapshot progress goes beside the token
        fields: dict[str, Any] = {"token": stored, "updated_at": datetime.now(timezone.utc), **extra}
        if cluster_time is not None:
            fields["cluster_time"] = cluster_time
        if namespace is not None:
            fields["namespace"] = namespace
        if level is not None:
            fields["level"] = level
        update: dict[str, Any] = {"$set": fields}
        if snapshot is not None:
            fields["snapshot"] = snapshot
        else:
            update["$unset"] = {"snapshot": ""}
        return update

    def delete(self, key: str) -> None:
        try:
            self.collection.delete_one({"_id": key})
        except PyMongoError as exc:
            raise StoreError(
                f"could not delete resume token {key!r} from {self.collection.full_name}: {exc}"
            ) from exc

    def ensure_indexes(self) -> None:
        try:
            self.collection.create_index([("updated_at", 1)], name="updated_at_1")
        except PyMongoError as exc:
            raise StoreError(f"could not create indexes on {self.collection.full_name}: {exc}") from exc


def _create_indexes(collection: Collection[Any], models: Sequence[IndexModel]) -> None:
    """Create each index with its own call (mongomock's ``create_indexes`` drops partial filters)."""
    for model in models:
        spec = dict(model.document)
        keys = list(spec.pop("key").items())
        try:
            collection.create_index(keys, **spec)
        except PyMongoError as exc:
            raise StoreError(
                f"could not create index {spec.get('name')} on {collection.full_name}: {exc}"
            ) from exc


def _created_range(start: datetime | None, end: datetime | None) -> dict[str, Any]:
    window: dict[str, Any] = {}
    if start is not None:
        window["$gte"] = start
    if end is not None:
        window["$lt"] = end
    return {"created_at": window} if window else {}


#: Go's zero ``time.Time`` (0001-01-01T00:00:00Z): the Go library's ``acked_at`` of a pending record.
GO_ZERO_TIME = datetime(1, 1, 1, tzinfo=timezone.utc)


def _is_pending(acked_at: Any) -> bool:
    """``acked_at`` of a pending record: missing, null (older Python builds) or Go's zero time."""
    return acked_at is None or (
        isinstance(acked_at, datetime) and (acked_at.year, acked_at.month, acked_at.day) == (1, 1, 1)
    )


class MongoAckStore(AckStore):
    """Ack records in the Go library's shape: ``{_id: event id, created_at, acked_at}``, with
    ``acked_at`` set to Go's zero time (``0001-01-01T00:00:00Z``) while pending.

    Go and Python services can share the collection: each reads the other's records
    (a null ``acked_at`` also reads as pending) and counts them alike.

    Indexes, as Go names them: ``created_at_1``; ``acked_at_1``, a TTL of ``ttl``
    limited by a partial filter to acked records (``acked_at`` after the zero time;
    not created when ``ttl`` is ``None``); and ``acked_at_pending``, a partial index
    of the pending ones.

    :param ttl: how long acked records are kept (``None``: forever).

    .. versionadded:: 0.1.0
    """

    def __init__(self, collection: Collection[Any], ttl: timedelta | None = timedelta(days=1)) -> None:
        self.collection = collection
        self.ttl = ttl

    def write(self, records: Sequence[AckRecord]) -> None:
        if not records:
            return
        ops = []
        for record in records:
            update: dict[str, Any] = {"$setOnInsert": {"created_at": record.created_at}}
            if record.acked_at is not None:
                update["$set"] = {"acked_at": record.acked_at}
            else:
                update["$setOnInsert"]["acked_at"] = GO_ZERO_TIME
            ops.append(UpdateOne({"_id": record.event_id}, update, upsert=True))
        try:
            self.collection.bulk_write(ops, ordered=True)
        except PyMongoError as exc:
            raise StoreError(
                f"could not write {len(ops)} ack record(s) to {self.collection.full_name}: {exc}"
            ) from exc

    def get(self, event_id: str) -> AckRecord | None:
        doc = self._call("read", lambda: self.collection.find_one({"_id": event_id}))
        return _ack(doc) if doc else None

    def _query(self, filter: AckFilter) -> dict[str, Any]:
        query = _created_range(filter.start, filter.end)
        # Go's queries, which its partial indexes serve; pending also takes a null or missing
        # acked_at (earlier builds of this library), which $eq of the zero time would miss.
        if filter.status is AckStatus.PENDING:
            query["acked_at"] = {"$in": [None, GO_ZERO_TIME]}
        elif filter.status is AckStatus.ACKED:
            query["acked_at"] = {"$gt": GO_ZERO_TIME}
        return query

    def list(self, filter: AckFilter = AckFilter()) -> list[AckRecord]:  # noqa: B008
        cursor = (
            self.collection.find(self._query(filter))
            .sort([("created_at", 1), ("_id", 1)])
            .skip(filter.offset)
            .limit(filter.limit)
        )
        return [_ack(d) for d in self._call("list", lambda: list(cursor))]

    def count(self, filter: AckFilter = AckFilter()) -> int:  # noqa: B008
        return int(self._call("count", lambda: self.collection.count_documents(self._query(filter))))

    def ensure_indexes(self) -> None:
        models = [IndexModel([("created_at", 1)], name="created_at_1")]
        if self.ttl is not None:
            models.append(
                IndexModel(
                    [("acked_at", 1)],
                    name="acked_at_1",
                    expireAfterSeconds=int(self.ttl.total_seconds()),
                    partialFilterExpression={"acked_at": {"$gt": GO_ZERO_TIME}},
                )
            )
        models.append(
            IndexModel(
                [("acked_at", 1)],
                name="acked_at_pending",
                partialFilterExpression={"acked_at": {"$eq": GO_ZERO_TIME}},
            )
        )
        _create_indexes(self.collection, models)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except PyMongoError as exc:
            raise StoreError(f"ack store {self.collection.full_name}: {what} failed: {exc}") from exc


def _ack(doc: Mapping[str, Any]) -> AckRecord:
    acked_at = doc.get("acked_at")
    return AckRecord(doc["_id"], doc["created_at"], None if _is_pending(acked_at) else acked_at)


class MongoDeadLetterStore(DeadLetterStore):
    """Dead letters in ``event_dlq``, in the Go event-dlq document shape: ``{_id (string),
    event_name, original_id, payload (binary), metadata (strings), error, retry_count,
    source, created_at, retried_at, quarantined_at}`` plus ``replay_count`` and
    ``quarantine_reason``, which Go ignores.

    ``payload`` is the raw change document encoded as BSON bytes; metadata values are written as strings
    (Go reads ``map[string]string``). Letters written by Go load too: their payload
    (Go's ``ChangeEvent`` JSON) is decoded into a mapping, but holds no change
    document, so :meth:`mongo_events.DeadLetters.replay` skips them.

    Indexes: Go's ``event_name_1``, ``created_at_1``, ``retried_at_1``,
    ``event_name_1_created_at_1`` and, with ``dedup``, the unique ``uniq_event_original``;
    plus ``original_id_1`` and ``source_created_at``.

    .. versionadded:: 0.1.0
    """

    def __init__(self, collection: Collection[Any], *, dedup: bool = True) -> None:
        super().__init__(dedup=dedup)
        self.collection = collection

    def store(self, letter: DeadLetter) -> str:
        doc = _letter_doc(letter)
        try:
            if self.dedup:
                found = self.collection.find_one_and_update(
                    {"event_name": letter.event_name, "original_id": letter.original_id},
                    {
                        "$setOnInsert": {k: v for k, v in doc.items() if k not in ("retry_count", "error")},
                        "$inc": {"retry_count": letter.retry_count},
                        "$set": {"error": letter.error},
                    },
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                    projection={"_id": 1},
                )
                if found is None:  # an upsert returning the new document always finds one
                    raise StoreError(f"dead letter for event {letter.original_id} was not written")
                return str(found["_id"])
            self.collection.insert_one(doc)
        except PyMongoError as exc:
            raise StoreError(
                f"could not store dead letter for event {letter.original_id} in {self.collection.full_name}: {exc}"
            ) from exc
        return letter.id

    def get(self, letter_id: str) -> DeadLetter | None:
        doc = self._call("read", lambda: self.collection.find_one({"_id": letter_id}))
        return _letter(doc) if doc else None

    def get_by_original_id(self, original_id: str) -> DeadLetter | None:
        doc = self._call(
            "read", lambda: self.collection.find_one({"original_id": original_id}, sort=[("created_at", -1)])
        )
        return _letter(doc) if doc else None

    def _query(self, filter: DeadLetterFilter) -> dict[str, Any]:
        query = _created_range(filter.start, filter.end)
        if filter.event_name is not None:
            query["event_name"] = filter.event_name
        if filter.source is not None:
            query["source"] = filter.source
        if filter.error is not None:
            query["error"] = {"$regex": re.escape(filter.error), "$options": "i"}
        if filter.max_retries is not None:
            query["retry_count"] = {"$lte": filter.max_retries}
        if filter.exclude_retried:
            query["retried_at"] = None
        if filter.exclude_quarantined:
            query["quarantined_at"] = None
        return query

    def list(self, filter: DeadLetterFilter = DeadLetterFilter()) -> list[DeadLetter]:  # noqa: B008
        cursor = (
            self.collection.find(self._query(filter))
            .sort([("created_at", 1), ("_id", 1)])
            .skip(filter.offset)
            .limit(filter.limit)
        )
        return [_letter(d) for d in self._call("list", lambda: list(cursor))]

    def count(self, filter: DeadLetterFilter = DeadLetterFilter()) -> int:  # noqa: B008
        return int(self._call("count", lambda: self.collection.count_documents(self._query(filter))))

    def update(
        self,
        letter_id: str,
        *,
        retried_at: datetime | None = None,
        quarantined_at: datetime | None = None,
        replay_count: int | None = None,
    ) -> None:
        fields = {
            k: v
            for k, v in (
                ("retried_at", retried_at),
                ("quarantined_at", quarantined_at),
                ("replay_count", replay_count),
            )
            if v is not None
        }
        if fields:
            self._call("update", lambda: self.collection.update_one({"_id": letter_id}, {"$set": fields}))

    def set_quarantine(self, letter_id: str, reason: str | None) -> bool:
        if reason is None:
            update: dict[str, Any] = {"$set": {"quarantined_at": None, "quarantine_reason": None}}
        else:
            update = {"$set": {"quarantined_at": datetime.now(timezone.utc), "quarantine_reason": reason}}
        return bool(
            self._call(
                "quarantine", lambda: self.collection.update_one({"_id": letter_id}, update)
            ).matched_count
        )

    def delete(self, letter_id: str) -> bool:
        return bool(
            self._call("delete", lambda: self.collection.delete_one({"_id": letter_id})).deleted_count
        )

    def delete_by_filter(self, filter: DeadLetterFilter) -> int:
        return int(
            self._call("delete", lambda: self.collection.delete_many(self._query(filter))).deleted_count
        )

    def ensure_indexes(self) -> None:
        # Go's event-dlq indexes by their names, so both libraries can share a collection.
        models = [
            IndexModel([("event_name", 1)], name="event_name_1"),
            IndexModel([("created_at", 1)], name="created_at_1"),
            IndexModel([("retried_at", 1)], name="retried_at_1"),
            IndexModel([("event_name", 1), ("created_at", 1)], name="event_name_1_created_at_1"),
            IndexModel([("original_id", 1)], name="original_id_1"),
            IndexModel([("source", 1), ("created_at", 1)], name="source_created_at"),
        ]
        if self.dedup:
            models.append(
                IndexModel([("event_name", 1), ("original_id", 1)], name="uniq_event_original", unique=True)
            )
        _create_indexes(self.collection, models)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except PyMongoError as exc:
            raise StoreError(f"dead-letter store {self.collection.full_name}: {what} failed: {exc}") from exc


def go_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """Metadata as the Go libraries store it (``map[string]string``); ``None`` values are left out.

    ``document_key`` becomes the Go transport's formatted key: its ``_id`` as a hex
    ObjectId, a string, a number, or JSON.
    """
    out = {}
    for key, value in metadata.items():
        if value is None:
            continue
        if key == "document_key" and isinstance(value, Mapping) and "_id" in value:
            key_id = value["_id"]
            # Go: the lowercase hex of a binary _id
            out[key] = key_id.hex() if isinstance(key_id, bytes) else _metadata_string(key_id)
        else:
            out[key] = _metadata_string(value)
    return out


def _metadata_string(value: Any) -> str:
    """A metadata value as Go's event-dlq stores it (``map[string]string``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (ObjectId, int, float)):
        return str(value)
    if isinstance(value, Timestamp):  # as Go's cluster_time metadata: RFC 3339, to the second
        return value.as_datetime().strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, datetime):
        return value.isoformat()
    return json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS)


def _letter_doc(letter: DeadLetter) -> dict[str, Any]:
    metadata = go_metadata(letter.metadata)
    return {
        "_id": letter.id,
        "event_name": letter.event_name,
        "original_id": letter.original_id,
        "payload": Binary(bson.encode(dict(letter.payload))),
        "metadata": metadata,
        "error": letter.error,
        "retry_count": letter.retry_count,
        "source": letter.source,
        "created_at": letter.created_at,
        "replay_count": letter.replay_count,
        "retried_at": letter.retried_at,
        "quarantined_at": letter.quarantined_at,
        "quarantine_reason": letter.quarantine_reason,
    }


def _payload(value: Any) -> Mapping[str, Any]:
    """A stored payload as a mapping: BSON bytes (ours), JSON bytes (Go's default), or a document."""
    if isinstance(value, Mapping):
        return value
    if not isinstance(value, (bytes, bytearray)):
        return {}
    data = bytes(value)
    try:
        return bson.decode(data)
    except Exception:  # not BSON: Go writes its ChangeEvent as JSON
        pass
    try:
        decoded = json_util.loads(data.decode("utf-8"))
    except Exception:
        return {"data": data}
    return decoded if isinstance(decoded, Mapping) else {"data": data}


def _letter(doc: Mapping[str, Any]) -> DeadLetter:
    return DeadLetter(
        id=str(doc["_id"]),
        event_name=doc["event_name"],
        original_id=doc.get("original_id", ""),
        payload=_payload(doc.get("payload")),
        metadata=doc.get("metadata") or {},
        error=doc.get("error", ""),
        retry_count=int(doc.get("retry_count", 0)),
        source=doc.get("source", ""),
        created_at=doc["created_at"],
        replay_count=int(doc.get("replay_count", 0)),
        retried_at=doc.get("retried_at"),
        quarantined_at=doc.get("quarantined_at"),
        quarantine_reason=doc.get("quarantine_reason"),
    )
