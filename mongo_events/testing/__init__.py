"""Test doubles for mongo-events (install the ``testing`` extra).

:class:`FakeReplicaSet` is a one-node replica set that a real
:class:`pymongo.MongoClient` talks to over the wire protocol. It is a test
double, not a database: data lives in mongomock, in memory (or in a journal
with ``data_dir``), and only what the library and its tests need is
implemented.
"""

from __future__ import annotations

from .server import FakeReplicaSet

__all__ = ["FakeReplicaSet"]
