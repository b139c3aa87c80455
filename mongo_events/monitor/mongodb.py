"""The MongoDB monitor store: the seed's ``monitor_entries`` collection."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import pymongo
from pymongo import IndexModel, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import PyMongoError

from ..errors import StoreError
from ..stores.mongodb import go_metadata
from .records import (
    MonitorEntry,
    MonitorFilter,
    MonitorPage,
    MonitorSummary,
    decode_cursor,
    encode_cursor,
    summarize,
)
from .store import MonitorStore, summary_range

__all__ = ["MongoMonitorStore"]

_KEY_FIELDS = ("event_id", "subscription_id")


def _query(filter: MonitorFilter) -> dict[str, Any]:
    query: dict[str, Any] = {}
    for name in ("event_id", "subscription_id", "event_name", "bus_id", "instance_id"):
        value = getattr(filter, name)
        if value is not None:
            query[name] = value
    if filter.statuses:
        query["status"] = {"$in": [s.value for s in filter.statuses]}
    if filter.has_error is True:
        query["error"] = {"$nin": [None, ""]}
    elif filter.has_error is False:
        query["error"] = {"$in": [None, ""]}
    started: dict[str, Any] = {}
    if filter.start_time is not None:
        started["$gte"] = filter.start_time
    if filter.end_time is not None:
        started["$lt"] = filter.end_time
    if started:
        query["started_at"] = started
    if filter.min_duration is not None:
        query["duration_ms"] = {"$gte": filter.min_duration.total_seconds() * 1000}
    if filter.min_retries is not None:
        query["retry_count"] = {"$gte": filter.min_retries}
    return query


def _after(cursor: str, desc: bool) -> dict[str, Any]:
    """Keyset condition: strictly after (or before, descending) the cursor's entry."""
    started, event_id, sub = decode_cursor(cursor)
    op = "$lt" if desc else "$gt"
    return {
        "$or": [
            {"started_at": {op: started}},
            {"started_at": started, "event_id": {op: event_id}},
            {"started_at": started, "event_id": event_id, "subscription_id": {op: sub}},
        ]
    }


class MongoMonitorStore(MonitorStore):
    """Entries in ``monitor_entries`` (the seed's fields), with the seed's indexes.

    Documents and index names are the Go monitor store's, so Go and Python services can
    share the collection: entries are upserted by ``(event_id, subscription_id)`` (its
    unique index) and get an ObjectId ``_id``; ``delivery_mode`` is ``"broadcast"``,
    ``duration_ms`` whole milliseconds and metadata values strings, as Go reads them.

    :param db: the database holding the collection.
    :param collection: its name.
    :param ttl: when given, a TTL index on ``started_at`` expires entries after it.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self, db: Database[Any], collection: str = "monitor_entries", ttl: timedelta | None = None
    ) -> None:
        if ttl is not None and ttl <= timedelta(0):
            raise ValueError("ttl must be positive (or None for no expiry)")
        self.collection: Collection[Any] = db[collection]
        self.ttl = ttl

    def _fail(self, what: str, exc: Exception) -> StoreError:
        return StoreError(f"monitor store {self.collection.full_name}: could not {what}: {exc}")

    def ensure_indexes(self) -> None:
        # Go's indexes under their default names (a same-key index under another name would
        # make the second library's createIndexes fail), plus one on subscription_id.
        t = [("started_at", 1), ("event_id", 1), ("subscription_id", 1)]
        models = [
            IndexModel([("event_id", 1), ("subscription_id", 1)], unique=True),
            IndexModel([("event_name", 1), *t]),
            IndexModel([("status", 1), *t]),
            IndexModel([("event_id", 1), ("started_at", 1)]),
            IndexModel([("bus_id", 1), ("started_at", 1)]),
            IndexModel([("subscriber_name", 1), ("started_at", 1)]),
            IndexModel([("subscription_id", 1), ("started_at", 1)]),
            IndexModel(t),
        ]
        if self.ttl is not None:
            models.append(
                IndexModel(
                    [("started_at", 1)],
                    name="started_at_ttl",
                    expireAfterSeconds=int(self.ttl.total_seconds()),
                )
            )
        try:
            self.collection.create_indexes(models)
        except PyMongoError as exc:
            raise self._fail("create indexes", exc) from exc

    def write(self, entries: Sequence[MonitorEntry]) -> None:
        if not entries:
            return
        ops = []
        for entry in entries:
            doc = entry.to_document()
            doc.setdefault("delivery_mode", "broadcast")
            if "metadata" in doc:
                doc["metadata"] = go_metadata(doc["metadata"])
            if "duration_ms" in doc:
                doc["duration_ms"] = round(doc["duration_ms"])  # Go reads an int64
            fields = {k: v for k, v in doc.items() if k not in _KEY_FIELDS}
            keys = {k: doc[k] for k in _KEY_FIELDS}
            unset = {k: "" for k in ("completed_at", "duration_ms") if k not in doc}
            update: dict[str, Any] = {"$set": fields, "$setOnInsert": keys}
            if unset:
                update["$unset"] = unset
            ops.append(UpdateOne(keys, update, upsert=True))
        try:
            self.collection.bulk_write(ops, ordered=False)
        except PyMongoError as exc:
            raise self._fail(f"write {len(ops)} entries", exc) from exc

    def get(self, event_id: str, subscription_id: str) -> MonitorEntry | None:
        try:
            doc = self.collection.find_one({"event_id": event_id, "subscription_id": subscription_id})
        except PyMongoError as exc:
            raise self._fail("read an entry", exc) from exc
        return MonitorEntry.from_document(doc) if doc else None

    def list(self, filter: MonitorFilter = MonitorFilter()) -> MonitorPage:  # noqa: B008
        query = _query(filter)
        if filter.cursor:
            query = (
                {"$and": [query, _after(filter.cursor, filter.order_desc)]}
                if query
                else _after(filter.cursor, filter.order_desc)
            )
        direction = pymongo.DESCENDING if filter.order_desc else pymongo.ASCENDING
        limit = filter.effective_limit
        try:
            docs = list(
                self.collection.find(query)
                .sort([("started_at", direction), ("event_id", direction), ("subscription_id", direction)])
                .limit(limit + 1)
            )
        except PyMongoError as exc:
            raise self._fail("list entries", exc) from exc
        entries = [MonitorEntry.from_document(d) for d in docs[:limit]]
        more = len(docs) > limit
        return MonitorPage(entries, encode_cursor(entries[-1]) if more and entries else None, more)

    def count(self, filter: MonitorFilter = MonitorFilter()) -> int:  # noqa: B008
        try:
            return int(self.collection.count_documents(_query(filter)))
        except PyMongoError as exc:
            raise self._fail("count entries", exc) from exc

    def summary(self, filter: MonitorFilter = MonitorFilter()) -> MonitorSummary:  # noqa: B008
        query = _query(summary_range(filter))
        pipeline = [
            {"$match": query},
            {
                "$group": {
                    "_id": {"e": "$event_name", "s": "$status", "i": "$instance_id"},
                    "n": {"$sum": 1},
                    "d": {"$sum": "$duration_ms"},
                    "dn": {"$sum": {"$cond": [{"$ifNull": ["$duration_ms", False]}, 1, 0]}},
                }
            },
        ]
        try:
            groups = list(self.collection.aggregate(pipeline))
            oldest = self.collection.find_one(query, sort=[("started_at", 1)], projection={"started_at": 1})
            newest = self.collection.find_one(query, sort=[("started_at", -1)], projection={"started_at": 1})
        except PyMongoError as exc:
            raise self._fail("summarise entries", exc) from exc
        rows = [
            (
                g["_id"].get("e", ""),
                g["_id"].get("s", ""),
                g["_id"].get("i", ""),
                int(g["n"]),
                float(g["d"] or 0),
                int(g["dn"]),
            )
            for g in groups
        ]

        def when(doc: Any) -> datetime | None:
            value = doc.get("started_at") if doc else None
            if isinstance(value, datetime) and value.tzinfo is None:
                value = value.replace(tzinfo=timezone.utc)
            return value if isinstance(value, datetime) else None

        return summarize(rows, when(oldest), when(newest))

    def delete_older_than(self, age: timedelta) -> int:
        cutoff = datetime.now(timezone.utc) - age
        try:
            return int(self.collection.delete_many({"started_at": {"$lt": cutoff}}).deleted_count)
        except PyMongoError as exc:
            raise self._fail("delete old entries", exc) from exc
