"""Resume tokens in a MongoDB collection (the seed's ``_event_resume_tokens`` schema)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from bson.timestamp import Timestamp
from pymongo.collection import Collection
from pymongo.errors import PyMongoError

from ..errors import StoreError
from .base import Checkpoint, ResumeTokenStore

__all__ = ["DEFAULT_COLLECTION", "MongoResumeTokenStore"]

DEFAULT_COLLECTION = "_event_resume_tokens"


class MongoResumeTokenStore(ResumeTokenStore):
    """Documents ``{_id: key, token, cluster_time, updated_at}`` with an index on ``updated_at``.

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
            raise StoreError(f"could not load resume token {key!r} from {self.collection.full_name}: {exc}") from exc
        if not doc or not doc.get("token"):
            return None
        return Checkpoint(doc["token"], doc.get("cluster_time"), doc.get("updated_at"))

    def save(self, key: str, token: Mapping[str, Any], cluster_time: Timestamp | None = None) -> None:
        fields: dict[str, Any] = {"token": dict(token), "updated_at": datetime.now(timezone.utc)}
        if cluster_time is not None:
            fields["cluster_time"] = cluster_time
        try:
            self.collection.update_one({"_id": key}, {"$set": fields}, upsert=True)
        except PyMongoError as exc:
            raise StoreError(f"could not save resume token {key!r} to {self.collection.full_name}: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self.collection.delete_one({"_id": key})
        except PyMongoError as exc:
            raise StoreError(f"could not delete resume token {key!r} from {self.collection.full_name}: {exc}") from exc

    def ensure_indexes(self) -> None:
        try:
            self.collection.create_index([("updated_at", 1)], name="updated_at_1")
        except PyMongoError as exc:
            raise StoreError(f"could not create indexes on {self.collection.full_name}: {exc}") from exc
