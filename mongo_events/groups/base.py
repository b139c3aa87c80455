"""The lease store contract: leases with fences, and the group document.

A lease gives one owner a key (a partition, or a member's heartbeat) for ``ttl`` seconds.
Its **fence** grows by one at every change of owner, never on a renewal, so a write that
carries a fence lower than the stored one comes from an owner that lost the key.
Expiry is judged by the store's clock (for MongoDB, the server's ``$$NOW`` and
``$currentDate``), never by comparing two hosts' clocks.

.. versionadded:: 0.2.0
"""

from __future__ import annotations

import abc
import os
import socket
import uuid

import attrs
from bson.timestamp import Timestamp

from ..errors import StoreError
from .partitioning import PartitionMode

__all__ = ["Owner", "Lease", "GroupConfig", "LeaseStore", "FencedOut", "GroupMismatch"]


class FencedOut(StoreError):
    """A write carried a fence lower than the stored one: its writer lost the lease.

    .. versionadded:: 0.2.0
    """


class GroupMismatch(StoreError):
    """A member's partition count or partitioning mode differs from the group document's,
    or the group document is malformed: fatal when the member starts, never retried.

    .. versionadded:: 0.2.0
    """


@attrs.frozen
class Owner:
    """Who holds a lease: host, process id and a random id (unique per member object).

    .. versionadded:: 0.2.0
    """

    host: str
    pid: int
    id: str

    @classmethod
    def here(cls) -> Owner:
        """This process, with a fresh random id."""
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex)

    def __str__(self) -> str:
        return f"{self.host}/{self.pid}/{self.id[:8]}"


@attrs.frozen
class Lease:
    """A held lease, as the store last confirmed it.

    :ivar key: what is leased (``"<group>:<namespace>#<p>"`` for a partition).
    :ivar owner: the holder.
    :ivar fence: the fence of this ownership; every fenced write of the holder carries it.
    """

    key: str
    owner: Owner
    fence: int


@attrs.frozen
class GroupConfig:
    """What every member of a group must agree on, kept in the group document.

    .. versionadded:: 0.2.0
    """

    name: str
    partitions: int
    mode: PartitionMode
    #: The cluster time the group was created (its first member joined); a partition without
    #: a checkpoint starts there. ``None`` for groups created before 0.2 or in memory.
    started_at: Timestamp | None = attrs.field(default=None, eq=False)
    #: What the group watches (``db.coll``, ``db.*`` or ``*.*``): a group is a name *and* a
    #: target, so buses of one name on different collections are separate groups, each with its
    #: own members, partition count and group document. ``None``: the name alone (the store's
    #: building blocks used directly).
    namespace: str | None = attrs.field(default=None, kw_only=True)

    @property
    def document_key(self) -> str:
        """The group document's key: ``"group:<name>:<namespace>"`` (``"group:<name>"`` without one)."""
        return f"group:{self.name}" if self.namespace is None else f"group:{self.name}:{self.namespace}"

    def describe(self) -> str:
        """``'billing' on shop.orders`` (for messages)."""
        return repr(self.name) if self.namespace is None else f"{self.name!r} on {self.namespace}"


class LeaseStore(abc.ABC):
    """Leases and group documents (MongoDB: the ``_event_leases`` collection).

    Every method raises :class:`mongo_events.StoreError` when the backend fails; a failed
    call never looks like "not held".

    .. versionadded:: 0.2.0
    """

    @abc.abstractmethod
    def acquire(self, key: str, owner: Owner, ttl: float) -> Lease | None:
        """Take ``key`` when it is free, expired or already ``owner``'s; ``None`` when another owner holds it.

        Taking it from nobody or from another owner grows the fence by one; re-acquiring
        one's own live lease renews it and keeps the fence.
        """

    @abc.abstractmethod
    def renew(self, lease: Lease, ttl: float) -> bool:
        """Extend ``lease`` by ``ttl`` from now; False when it is no longer ``lease.owner``'s with ``lease.fence``."""

    @abc.abstractmethod
    def release(self, lease: Lease) -> None:
        """Give ``lease`` up at once (nothing happens when it was lost already). The fence is kept."""

    @abc.abstractmethod
    def live(self, prefix: str) -> dict[str, Owner]:
        """The unexpired held leases whose key starts with ``prefix``, by key."""

    @abc.abstractmethod
    def fence(self, key: str) -> int:
        """The current fence of ``key`` (0 when it was never taken)."""

    @abc.abstractmethod
    def join_group(self, config: GroupConfig) -> GroupConfig:
        """Create the group document, or check ``config`` against it.

        :raises GroupMismatch: when the stored partition count or mode differs.
        """

    def forget(self, prefix: str, expired_for: float) -> int:
        """Delete the leases under ``prefix`` that expired (or were released) at least
        ``expired_for`` seconds ago; returns how many. Members sweep their group's *heartbeat*
        leases with it (one per member object ever started); never call it on partition keys,
        whose fences must outlive their owners. The default keeps everything.

        .. versionadded:: 0.2.0
        """
        return 0

    def ensure_indexes(self) -> None:  # noqa: B027 - optional hook
        """Create the indexes the store needs."""

    def close(self) -> None:  # noqa: B027
        """Release resources."""


def check_ttl(ttl: float) -> None:
    """Refuse a lease ttl that is not a positive finite number."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < float("inf"):
        raise ValueError(f"lease ttl must be a positive number of seconds, not {ttl!r}")


def mismatch(stored: GroupConfig, wanted: GroupConfig) -> GroupMismatch | None:
    """The error for a member that disagrees with the stored group document, or ``None``."""
    if (stored.partitions, stored.mode) == (wanted.partitions, wanted.mode):
        return None
    return GroupMismatch(
        f"consumer group {wanted.describe()} has partitions={stored.partitions} and mode={stored.mode.value!r}, "
        f"but this member has partitions={wanted.partitions} and mode={wanted.mode.value!r}. Members of a "
        "group must agree (each partition is one checkpoint). They are fixed for the group's lifetime: its "
        f"document {wanted.document_key!r} in the lease collection keeps them after every member stopped. "
        "Start this member with the group's values, or change them as README.rst's \"Changing a group's "
        "partitions\" says (stop every member, delete that document, rewind the new partitions' checkpoints)"
    )
