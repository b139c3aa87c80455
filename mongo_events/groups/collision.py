"""Two buses without a group that write the same checkpoint key: say so, loudly.

Without ``group=``, every bus that starts consumes every change, and buses that share a
``resume_token_id`` also share one checkpoint, each overwriting the other's position. The
bus's MongoDB checkpoint store stamps each write with its writer (host, pid, a random id)
and notices another writer's stamp, in the same round trip in the common case (an upsert that
matches only an unstamped document or its own stamp collides with another writer's). A
stamp that is not its own, after its own first write, means another live bus wrote the
key in between: an ERROR names both.

.. versionadded:: 0.2.0
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bson.timestamp import Timestamp
from pymongo.errors import DuplicateKeyError, PyMongoError

from ..errors import StoreError
from ..stores.mongodb import MongoResumeTokenStore
from .base import Owner

__all__ = ["StampedResumeTokenStore"]

log = logging.getLogger(__name__)


class StampedResumeTokenStore(MongoResumeTokenStore):
    """A :class:`~mongo_events.MongoResumeTokenStore` whose writes carry a ``writer`` stamp
    and notice another writer of the same key (same documents otherwise; one round trip a write
    unless another writer's stamp is found).

    :param store: the store to stamp (its collection is used).
    :param bus: the bus's name, for the log line.

    .. versionadded:: 0.2.0
    """

    def __init__(self, store: MongoResumeTokenStore, bus: str) -> None:
        super().__init__(store.collection)
        self.bus = bus
        me = Owner.here()
        self.writer = {"host": me.host, "pid": me.pid, "id": me.id}
        self._written: set[str] = set()
        self._reported: set[str] = set()
        #: Other writers seen, by id (for tests and health).
        self.collisions = 0

    def save(
        self,
        key: str,
        token: Mapping[str, Any],
        cluster_time: Timestamp | None = None,
        *,
        namespace: str | None = None,
        level: str | None = None,
    ) -> None:
        update = MongoResumeTokenStore.update_for(
            token, cluster_time, namespace=namespace, level=level, writer=self.writer
        )
        mine = {"_id": key, "$or": [{"writer.id": self.writer["id"]}, {"writer": {"$exists": False}}]}
        try:
            try:
                # The common case, one round trip: the key is new, unstamped or already ours.
                self.collection.update_one(mine, update, upsert=True)
            except DuplicateKeyError:
                # Another writer's stamp (the upsert collided with its document): a predecessor
                # before our first write, a live twin after it. Write anyway, then say so.
                other = self.collection.find_one({"_id": key}, {"writer": 1})
                self.collection.update_one({"_id": key}, update, upsert=True)
                stamp = (other or {}).get("writer")
                if key in self._written and isinstance(stamp, Mapping):
                    self._collided(key, stamp)
        except PyMongoError as exc:
            raise StoreError(
                f"could not save resume token {key!r} to {self.collection.full_name}: {exc}"
            ) from exc
        self._written.add(key)

    def _collided(self, key: str, other: Mapping[str, Any]) -> None:
        self.collisions += 1
        seen = str(other.get("id"))
        if seen in self._reported:
            return
        self._reported.add(seen)
        log.error(
            "bus %s: another live bus writes the same checkpoint %r: %s (pid %s) and this one, %s (pid %s). "
            "Each overwrites the other's position and both handle every change. Give each independent "
            "consumer its own resume_token_id, or share the work with group=... (consumer groups)",
            self.bus,
            key,
            other.get("host"),
            other.get("pid"),
            self.writer["host"],
            self.writer["pid"],
        )
