"""The MongoDB idempotency store: one document per key, claimed with ``find_one_and_update``."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from ..errors import StoreError
from .base import Claim, ClaimStatus, IdempotencyStore, check_processing_ttl

__all__ = ["MongoIdempotencyStore", "DEFAULT_COLLECTION"]

#: The Go library's collection name.
DEFAULT_COLLECTION = "event_idempotency"

T = TypeVar("T")


def _now() -> datetime:
    # Naive UTC, as pymongo returns dates by default (and mongomock compares them).
    return datetime.now(timezone.utc).replace(tzinfo=None)


class OwnerId:
    """Names a store instance in the claims it holds: host, process and a random suffix.

    Computed again in a forked child, so web-server workers that inherit one store
    never release each other's claims.
    """

    def __init__(self) -> None:
        self._pid = -1
        self._value = ""

    def get(self) -> str:
        pid = os.getpid()
        if pid != self._pid:
            try:
                host = socket.gethostname() or "host"
            except OSError:
                host = "host"
            self._value, self._pid = f"{host}:{pid}:{uuid.uuid4().hex[:8]}", pid
        return self._value


class MongoIdempotencyStore(IdempotencyStore):
    """Documents ``{_id: key, status, owner, claimed_until, starts, expires_at, updated_at}``.

    ``status`` is ``processing``, ``completed`` or ``released``. A claim is one
    ``find_one_and_update`` (upsert) that matches only a claimable document (released, or
    its claim or record expired); a live one makes the upsert hit the unique ``_id``, which
    is how two processes racing for a key get exactly one winner. A TTL index on
    ``expires_at`` deletes completed keys ``ttl`` after completion; claims are kept at least
    as long, so their count of unfinished starts survives a crash loop.

    Times are the client's clock: keep hosts in NTP sync, and ``processing_ttl`` well above
    the clock skew between them.

    :param collection: a pymongo collection, or a pymongo ``Database`` to use
        ``event_idempotency`` in.
    :param ttl: how long a completed key is remembered (default 24 hours).

    .. versionadded:: 0.1.0
    """

    def __init__(self, collection: Any, ttl: timedelta = timedelta(hours=24)) -> None:
        super().__init__(ttl)
        if collection is None:
            raise TypeError("MongoIdempotencyStore needs a pymongo Collection (or Database)")
        if isinstance(collection, Database):
            collection = collection[DEFAULT_COLLECTION]
        self.collection: Collection[Any] = collection
        self._owner = OwnerId()

    @property
    def owner(self) -> str:
        """This process's name in the claims it holds."""
        return self._owner.get()

    def try_claim(self, key: str, processing_ttl: timedelta) -> Claim:
        hold = check_processing_ttl(processing_ttl)
        for _ in range(3):  # a key that vanishes between the upsert and the read is tried again
            now = _now()
            claimable = {
                "_id": key,
                "$or": [
                    {"expires_at": {"$lte": now}},
                    {"status": {"$ne": "completed"}, "claimed_until": {"$lte": now}},
                ],
            }
            update = {
                "$set": {
                    "status": "processing",
                    "owner": self.owner,
                    "claimed_until": now + timedelta(seconds=hold),
                    "expires_at": now + max(self.ttl, timedelta(seconds=hold)),
                    "updated_at": now,
                },
                "$inc": {"starts": 1},
            }
            try:
                doc = self._call(
                    "claim",
                    key,
                    lambda claimable=claimable, update=update: self.collection.find_one_and_update(  # type: ignore[misc]
                        claimable,
                        update,
                        upsert=True,
                        return_document=ReturnDocument.AFTER,
                        projection={"starts": 1},
                    ),
                )
                return Claim(ClaimStatus.CLAIMED, int((doc or {}).get("starts", 1)))
            except DuplicateKeyError:
                pass
            found = self._call(
                "claim",
                key,
                lambda: self.collection.find_one({"_id": key}, projection={"status": 1, "starts": 1}),
            )
            if found is not None:
                status = ClaimStatus.COMPLETED if found.get("status") == "completed" else ClaimStatus.BUSY
                return Claim(status, int(found.get("starts", 0)))
        raise StoreError(
            f"idempotency store {self.collection.full_name}: could not claim {key!r}: it keeps changing"
        )

    def complete(self, key: str) -> None:
        now = _now()
        self._call(
            "complete",
            key,
            lambda: self.collection.update_one(
                {"_id": key},
                {
                    "$set": {
                        "status": "completed",
                        "expires_at": now + self.ttl,
                        "updated_at": now,
                        "starts": 0,
                    },
                    "$unset": {"owner": "", "claimed_until": ""},
                },
                upsert=True,
            ),
        )

    def release(self, key: str) -> None:
        now = _now()
        self._call(
            "release",
            key,
            lambda: self.collection.update_one(
                {"_id": key, "owner": self.owner, "status": "processing"},
                {
                    "$set": {"status": "released", "claimed_until": now, "updated_at": now},
                    "$inc": {"starts": -1},
                },
            ),
        )

    def remove(self, key: str) -> None:
        self._call("remove", key, lambda: self.collection.delete_one({"_id": key}))

    def ensure_indexes(self) -> None:
        try:
            self.collection.create_index([("expires_at", 1)], name="expires_at_ttl", expireAfterSeconds=0)
        except PyMongoError as exc:
            raise StoreError(f"could not create indexes on {self.collection.full_name}: {exc}") from exc

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except DuplicateKeyError:
            raise
        except PyMongoError as exc:
            raise StoreError(
                f"idempotency store {self.collection.full_name}: {what} {key!r} failed: {exc}"
            ) from exc

    def __repr__(self) -> str:
        return f"<MongoIdempotencyStore {self.collection.full_name} ttl={self.ttl}>"
