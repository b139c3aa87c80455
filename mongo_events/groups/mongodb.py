"""The MongoDB lease store: ``_event_leases``, beside the checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from bson.timestamp import Timestamp
from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError, PyMongoError
from pymongo.write_concern import WriteConcern

from ..errors import StoreError
from .base import GroupConfig, GroupMismatch, Lease, LeaseStore, Owner, check_ttl, mismatch
from .partitioning import PartitionMode

__all__ = ["MongoLeaseStore", "DEFAULT_LEASE_COLLECTION"]

DEFAULT_LEASE_COLLECTION = "_event_leases"

T = TypeVar("T")

#: True when a lease document has not been renewed within its ttl, by the server's clock.
_EXPIRED = {"$expr": {"$gt": [{"$subtract": ["$$NOW", "$renewed_at"]}, "$ttl_ms"]}}
_UNEXPIRED = {"$expr": {"$lte": [{"$subtract": ["$$NOW", "$renewed_at"]}, "$ttl_ms"]}}


class MongoLeaseStore(LeaseStore):
    """Lease documents ``{_id: key, owner: {host, pid, id} | null, fence, renewed_at, ttl_ms}``
    and group documents ``{_id: "group:<name>:<namespace>", partitions, mode, started_at}``.

    Every write is one ``find_one_and_update`` (or ``update_one``) with ``w: "majority"``:
    a lease write that a failover rolls back must never make two owners. ``renewed_at`` is
    set by the server (``$currentDate``) and expiry is a server-side ``$expr`` against
    ``$$NOW`` (MongoDB 4.2+), so no two hosts' clocks are ever compared.

    :param collection: by default ``_event_leases`` in the database of the checkpoints.

    .. versionadded:: 0.2.0
    """

    def __init__(self, collection: Collection[Any]) -> None:
        if collection is None:
            raise TypeError("MongoLeaseStore needs a pymongo Collection")
        self.collection = collection.with_options(write_concern=WriteConcern("majority"))

    def acquire(self, key: str, owner: Owner, ttl: float) -> Lease | None:
        check_ttl(ttl)
        ttl_ms = int(ttl * 1000)
        mine = {"_id": key, "owner.id": owner.id, **_UNEXPIRED}
        renew = {"$set": {"ttl_ms": ttl_ms}, "$currentDate": {"renewed_at": True}}
        doc = self._call(
            f"acquire lease {key!r}",
            lambda: self.collection.find_one_and_update(mine, renew, return_document=ReturnDocument.AFTER),
        )
        if doc is not None:
            return Lease(key, owner, int(doc["fence"]))
        free = {"_id": key, "$or": [{"owner": None}, _EXPIRED]}
        take = {
            "$set": {"owner": _owner_doc(owner), "ttl_ms": ttl_ms},
            "$inc": {"fence": 1},
            "$currentDate": {"renewed_at": True},
        }
        try:
            doc = self.collection.find_one_and_update(
                free, take, upsert=True, return_document=ReturnDocument.AFTER
            )
        except DuplicateKeyError:
            return None  # it exists and is held: the upsert collided with it
        except PyMongoError as exc:
            raise StoreError(
                f"could not acquire lease {key!r} in {self.collection.full_name}: {exc}"
            ) from exc
        if doc is None:  # an upsert returning the new document always finds one
            raise StoreError(f"lease {key!r} in {self.collection.full_name}: the server returned no document")
        return Lease(key, owner, int(doc["fence"]))

    def renew(self, lease: Lease, ttl: float) -> bool:
        check_ttl(ttl)
        query = {"_id": lease.key, "owner.id": lease.owner.id, "fence": lease.fence}
        update = {"$set": {"ttl_ms": int(ttl * 1000)}, "$currentDate": {"renewed_at": True}}
        result = self._call(f"renew lease {lease.key!r}", lambda: self.collection.update_one(query, update))
        return bool(result.matched_count)

    def release(self, lease: Lease) -> None:
        query = {"_id": lease.key, "owner.id": lease.owner.id, "fence": lease.fence}
        self._call(
            f"release lease {lease.key!r}",
            lambda: self.collection.update_one(query, {"$set": {"owner": None}}),
        )

    def live(self, prefix: str) -> dict[str, Owner]:
        query = {"_id": {"$regex": "^" + _escape(prefix)}, "owner": {"$ne": None}, **_UNEXPIRED}
        docs = self._call("list leases", lambda: list(self.collection.find(query)))
        return {doc["_id"]: _owner(doc["owner"]) for doc in docs}

    def forget(self, prefix: str, expired_for: float) -> int:
        # Past its expiry (renewed_at + ttl_ms, by the server's clock) by expired_for; a
        # released lease keeps its last renewed_at, so it ages the same way.
        age = {"$subtract": [{"$subtract": ["$$NOW", "$renewed_at"]}, "$ttl_ms"]}
        query = {"_id": {"$regex": "^" + _escape(prefix)}, "$expr": {"$gte": [age, int(expired_for * 1000)]}}
        result = self._call("forget leases", lambda: self.collection.delete_many(query))
        return int(result.deleted_count)

    def fence(self, key: str) -> int:
        doc = self._call(f"read lease {key!r}", lambda: self.collection.find_one({"_id": key}, {"fence": 1}))
        return int(doc.get("fence", 0)) if doc else 0

    def join_group(self, config: GroupConfig) -> GroupConfig:
        key = config.document_key
        fields: dict[str, Any] = {"partitions": config.partitions, "mode": config.mode.value}
        # The server's cluster time now, kept by the first member only ($setOnInsert).
        now = self._call(f"join group {config.describe()}", lambda: self.collection.database.command("ping"))
        if isinstance(now.get("operationTime"), Timestamp):
            fields["started_at"] = now["operationTime"]
        doc = self._call(
            f"join group {config.describe()}",
            lambda: self.collection.find_one_and_update(
                {"_id": key}, {"$setOnInsert": fields}, upsert=True, return_document=ReturnDocument.AFTER
            ),
        )
        if doc is None:  # an upsert returning the new document always finds one
            raise StoreError(
                f"group {config.describe()} in {self.collection.full_name}: the server returned no document"
            )
        try:
            started = doc.get("started_at")
            if started is not None and not isinstance(started, Timestamp):
                raise TypeError(f"started_at is a {type(started).__name__}, not a Timestamp")
            stored = GroupConfig(
                config.name,
                int(doc["partitions"]),
                PartitionMode(doc["mode"]),
                started,
                namespace=config.namespace,
            )
        except (KeyError, TypeError, ValueError) as exc:
            # A mismatch, not a store failure: fatal at start, never retried at every poll.
            raise GroupMismatch(
                f"the group document {key!r} in {self.collection.full_name} is malformed: {doc!r}; "
                "fix it (partitions: an int, mode: 'server' or 'client', started_at: a Timestamp)"
            ) from exc
        problem = mismatch(stored, config)
        if problem is not None:
            raise problem
        return stored

    def ensure_indexes(self) -> None:
        pass  # every query is by _id (or an _id prefix)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except PyMongoError as exc:
            raise StoreError(f"could not {what} in {self.collection.full_name}: {exc}") from exc


def _owner_doc(owner: Owner) -> dict[str, Any]:
    return {"host": owner.host, "pid": owner.pid, "id": owner.id}


def _owner(doc: Any) -> Owner:
    return Owner(str(doc.get("host")), int(doc.get("pid") or 0), str(doc.get("id")))


def _escape(text: str) -> str:
    import re

    return re.escape(text)
