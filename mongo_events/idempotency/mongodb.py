"""The MongoDB idempotency store: one document per key, claimed with ``find_one_and_update``."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from datetime import timedelta
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


def _later(ms: int) -> dict[str, Any]:
    """The server's clock plus ``ms`` milliseconds, a date (``$subtract`` of a negative
    number: ``$add`` of a date is the same on a server but mongomock only adds numbers)."""
    return {"$subtract": ["$$NOW", -ms]}


#: A key may be claimed when it is new, its record expired, or it is not completed and its
#: claim expired: judged by the server's clock (``$$NOW``), never a client's.
_CLAIMABLE: dict[str, Any] = {
    "$or": [
        {"$eq": [{"$ifNull": ["$status", None]}, None]},
        {"$lte": ["$expires_at", "$$NOW"]},
        {"$and": [{"$ne": ["$status", "completed"]}, {"$lte": ["$claimed_until", "$$NOW"]}]},
    ]
}


class OwnerId:
    """Names a store instance in the claims it holds: host, process and a random suffix.

    The process id is read again at every call, so web-server workers forked from one
    parent that made the store never release each other's claims. The suffix is drawn
    once, so every thread of a process gets the same name: drawn at first use, two
    workers racing there took different names, and the release of a claim taken under
    one name matched nothing under the other (the claim then stayed held and a crash
    was counted twice).
    """

    def __init__(self) -> None:
        self._suffix = uuid.uuid4().hex[:8]
        self._host = ""
        self._pid = -1
        self._value = ""

    def get(self) -> str:
        pid = os.getpid()
        if pid != self._pid:
            if not self._host:
                try:
                    self._host = socket.gethostname() or "host"
                except OSError:
                    self._host = "host"
            # Every racing thread computes the same value, so the race is harmless.
            self._value = f"{self._host}:{pid}:{self._suffix}"
            self._pid = pid
        return self._value


class MongoIdempotencyStore(IdempotencyStore):
    """Documents ``{_id: key, status, owner, claim, claimed_until, starts, expires_at, updated_at}``.

    ``status`` is ``processing``, ``completed`` or ``released``. A claim is one
    ``find_one_and_update`` (upsert) by ``_id`` whose update pipeline takes the key only
    when it is claimable (new, released, or its claim or record expired) and otherwise
    leaves it as it was; single-document atomicity gives two processes racing for a key
    exactly one winner. A TTL index on
    ``expires_at`` deletes completed keys ``ttl`` after completion; claims are kept at least
    as long, so their count of unfinished starts survives a crash loop.

    Every time is the server's clock (``$$NOW`` in pipeline updates, MongoDB 4.2+): the
    clients' clocks are never compared, so a host whose clock is off cannot take a live
    claim. ``claim`` is a nonce naming the claim that took the key.

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
        hold_ms = max(1, round(hold * 1000))
        keep_ms = max(round(self.ttl.total_seconds() * 1000), hold_ms)
        for _ in range(3):  # two clients inserting a new key at once: the loser looks again
            nonce = uuid.uuid4().hex
            fresh = {
                "status": "processing",
                "owner": self.owner,
                "claim": nonce,
                "claimed_until": _later(hold_ms),
                "expires_at": _later(keep_ms),
                "updated_at": "$$NOW",
                "starts": {"$add": [{"$ifNull": ["$starts", 0]}, 1]},
            }
            # One pipeline update judges expiry by the server's clock ($$NOW) and takes the
            # key only when it is claimable; otherwise it leaves the document as it was.
            update = [{"$set": {f: {"$cond": [_CLAIMABLE, v, f"${f}"]} for f, v in fresh.items()}}]
            try:
                doc = self._call(
                    "claim",
                    key,
                    lambda update=update: self.collection.find_one_and_update(  # type: ignore[misc]
                        {"_id": key},
                        update,
                        upsert=True,
                        return_document=ReturnDocument.AFTER,
                        projection={"status": 1, "starts": 1, "claim": 1},
                    ),
                )
            except DuplicateKeyError:
                continue
            doc = doc or {}
            if doc.get("claim") == nonce:
                return Claim(ClaimStatus.CLAIMED, int(doc.get("starts", 1)))
            status = ClaimStatus.COMPLETED if doc.get("status") == "completed" else ClaimStatus.BUSY
            return Claim(status, int(doc.get("starts") or 0))
        raise StoreError(
            f"idempotency store {self.collection.full_name}: could not claim {key!r}: it keeps changing"
        )

    def complete(self, key: str) -> None:
        ttl_ms = round(self.ttl.total_seconds() * 1000)
        self._call(
            "complete",
            key,
            lambda: self.collection.update_one(
                {"_id": key},
                [
                    # $project rather than $unset, which mongomock's pipelines lack
                    {"$project": {"owner": 0, "claim": 0, "claimed_until": 0}},
                    {
                        "$set": {
                            "status": "completed",
                            "expires_at": _later(ttl_ms),
                            "updated_at": "$$NOW",
                            "starts": 0,
                        }
                    },
                ],
                upsert=True,
            ),
        )

    def release(self, key: str) -> None:
        self._call(
            "release",
            key,
            lambda: self.collection.update_one(
                {"_id": key, "owner": self.owner, "status": "processing"},
                [
                    {
                        "$set": {
                            "status": "released",
                            "claimed_until": "$$NOW",
                            "updated_at": "$$NOW",
                            "starts": {"$subtract": [{"$ifNull": ["$starts", 1]}, 1]},
                        }
                    }
                ],
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
