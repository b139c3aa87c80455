"""Fenced checkpoint writes: a partition's owner writes its position only while its fence is current."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from bson.timestamp import Timestamp
from pymongo.errors import DuplicateKeyError, PyMongoError
from pymongo.write_concern import WriteConcern

from ..errors import StoreError
from ..stores.base import Checkpoint, ResumeTokenStore
from ..stores.memory import MemoryResumeTokenStore
from ..stores.mongodb import MongoResumeTokenStore
from .base import FencedOut

__all__ = ["FencedResumeTokenStore", "MemoryFencedResumeTokenStore", "save_fenced", "raise_fence"]


class MemoryFencedResumeTokenStore(MemoryResumeTokenStore):
    """A :class:`~mongo_events.MemoryResumeTokenStore` that also keeps each key's fence.

    .. versionadded:: 0.2.0
    """

    def __init__(self) -> None:
        super().__init__()
        self.fences: dict[str, int] = {}

    def save_fenced(
        self,
        key: str,
        token: Mapping[str, Any],
        cluster_time: Timestamp | None,
        fence: int,
        *,
        namespace: str | None = None,
        level: str | None = None,
    ) -> None:
        """Save like ``save``, unless ``key``'s stored fence is higher than ``fence``.

        :raises FencedOut: when it is.
        """
        with self._lock:
            stored = self.fences.get(key, 0)
            if stored > fence:
                raise _fenced_out(key, fence, stored, "memory")
            self.fences[key] = fence
            self._data[key] = Checkpoint(
                dict(token), cluster_time, datetime.now(timezone.utc), namespace, level
            )
            self.saves += 1


def save_fenced(
    store: ResumeTokenStore,
    key: str,
    token: Mapping[str, Any],
    cluster_time: Timestamp | None,
    fence: int,
    *,
    namespace: str | None = None,
    level: str | None = None,
) -> None:
    """Write a checkpoint only when ``fence`` is not lower than the stored one, atomically on the store.

    For :class:`~mongo_events.MongoResumeTokenStore` it is one conditional upsert with
    ``w: "majority"``: ``{_id: key, $or: [{fence: {$lte: fence}}, {fence: {$exists: false}}]}``;
    a stored document with a higher fence makes the upsert collide on ``_id``. The document
    keeps the store's shape plus a ``fence`` field, so ``load`` (and the Go library) read it as before.

    :raises FencedOut: when the stored fence is higher: the writer lost its lease.
    :raises TypeError: for a store that cannot compare fences atomically (a file, a custom store).
    :raises StoreError: when the backend fails.
    """
    if isinstance(fence, bool) or not isinstance(fence, int) or fence < 1:
        raise ValueError(f"a fence is a positive int from a lease, not {fence!r}")
    if isinstance(store, MemoryFencedResumeTokenStore):
        store.save_fenced(key, token, cluster_time, fence, namespace=namespace, level=level)
        return
    if not isinstance(store, MongoResumeTokenStore):
        raise TypeError(
            f"{type(store).__name__} cannot refuse stale writes atomically; a consumer group needs "
            "MongoResumeTokenStore (or MemoryFencedResumeTokenStore in one process)"
        )
    update = MongoResumeTokenStore.update_for(
        token, cluster_time, namespace=namespace, level=level, fence=fence
    )
    collection = store.collection.with_options(write_concern=WriteConcern("majority"))
    query = {"_id": key, "$or": [{"fence": {"$lte": fence}}, {"fence": {"$exists": False}}]}
    try:
        collection.update_one(query, update, upsert=True)
    except DuplicateKeyError:
        try:
            doc = collection.find_one({"_id": key}, {"fence": 1})
        except PyMongoError:
            doc = None
        raise _fenced_out(key, fence, (doc or {}).get("fence"), collection.full_name) from None
    except PyMongoError as exc:
        raise StoreError(f"could not save resume token {key!r} to {collection.full_name}: {exc}") from exc


def raise_fence(store: ResumeTokenStore, key: str, fence: int) -> None:
    """Stamp an existing checkpoint with ``fence`` (a new owner, at takeover), leaving its token alone.

    From then on the previous owner's writes are refused, even before the new owner's first
    checkpoint write. Nothing happens when the key has no checkpoint yet or a higher fence.

    :raises StoreError: when the backend fails.
    """
    if isinstance(store, MemoryFencedResumeTokenStore):
        with store._lock:
            if key in store._data:
                store.fences[key] = max(store.fences.get(key, 0), fence)
        return
    if not isinstance(store, MongoResumeTokenStore):
        raise TypeError(f"{type(store).__name__} cannot take fenced writes; see save_fenced()")
    collection = store.collection.with_options(write_concern=WriteConcern("majority"))
    query = {"_id": key, "$or": [{"fence": {"$lt": fence}}, {"fence": {"$exists": False}}]}
    try:
        collection.update_one(query, {"$set": {"fence": fence}})
    except PyMongoError as exc:
        raise StoreError(f"could not fence checkpoint {key!r} in {collection.full_name}: {exc}") from exc


def _fenced_out(key: str, fence: int, stored: Any, where: str) -> FencedOut:
    return FencedOut(
        f"refused the checkpoint {key!r} with fence {fence} in {where}: the stored fence is {stored}. "
        "Another member took this partition over; this one must stop it without writing or delivering"
    )


class FencedResumeTokenStore(ResumeTokenStore):
    """A resume-token store bound to one lease's fence: ``save`` is :func:`save_fenced`.

    What a partition's stream consumer gets instead of the plain store: built at
    ``on_assigned(partition, fence)``, dropped at ``on_revoked``.

    :param store: a :class:`~mongo_events.MongoResumeTokenStore` or :class:`MemoryFencedResumeTokenStore`.
    :param fence: the fence of the partition's lease.

    .. versionadded:: 0.2.0
    """

    def __init__(self, store: ResumeTokenStore, fence: int) -> None:
        if not isinstance(store, (MongoResumeTokenStore, MemoryFencedResumeTokenStore)):
            raise TypeError(f"{type(store).__name__} cannot take fenced writes; see save_fenced()")
        if isinstance(fence, bool) or not isinstance(fence, int) or fence < 1:
            raise ValueError(f"a fence is a positive int from a lease, not {fence!r}")
        self.store = store
        self.fence = fence

    def load(self, key: str) -> Checkpoint | None:
        return self.store.load(key)

    def save(
        self,
        key: str,
        token: Mapping[str, Any],
        cluster_time: Timestamp | None = None,
        *,
        namespace: str | None = None,
        level: str | None = None,
    ) -> None:
        save_fenced(self.store, key, token, cluster_time, self.fence, namespace=namespace, level=level)

    def delete(self, key: str) -> None:
        self.store.delete(key)

    def ensure_indexes(self) -> None:
        self.store.ensure_indexes()

    def close(self) -> None:
        """Leaves the wrapped store open: it is shared by the partitions."""
