"""Consumer groups: leases with fences, partition assignment and partition hashing (building blocks).

The coordination layer of ``Bus(group=..., partitions=..., lease_ttl=...)``: the bus's stream
consumers hook into :class:`GroupMember`'s ``on_assigned`` / ``on_revoked`` callbacks and
write their checkpoints through :class:`FencedResumeTokenStore`.

.. versionadded:: 0.2.0
"""

from __future__ import annotations

from .assignment import LeaseTimer, Plan, assign, max_share, plan
from .base import FencedOut, GroupConfig, GroupMismatch, Lease, LeaseStore, Owner
from .fencing import FencedResumeTokenStore, MemoryFencedResumeTokenStore, raise_fence, save_fenced
from .member import GroupMember, partition_key
from .memory import MemoryLeaseStore
from .mongodb import DEFAULT_LEASE_COLLECTION, MongoLeaseStore
from .partitioning import (
    PartitionMode,
    event_partition,
    hashed_index_key,
    partition_of,
    server_match_stage,
    server_supports_hashed_keys,
)

__all__ = [
    "DEFAULT_LEASE_COLLECTION",
    "FencedOut",
    "FencedResumeTokenStore",
    "GroupConfig",
    "GroupMember",
    "GroupMismatch",
    "Lease",
    "LeaseStore",
    "LeaseTimer",
    "MemoryFencedResumeTokenStore",
    "MemoryLeaseStore",
    "MongoLeaseStore",
    "Owner",
    "PartitionMode",
    "Plan",
    "assign",
    "event_partition",
    "hashed_index_key",
    "max_share",
    "partition_key",
    "partition_of",
    "plan",
    "raise_fence",
    "save_fenced",
    "server_match_stage",
    "server_supports_hashed_keys",
]
