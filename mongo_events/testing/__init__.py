"""Test doubles for mongo-events (install the ``testing`` extra).

:class:`FakeReplicaSet` is a one-node replica set that a real
:class:`pymongo.MongoClient` talks to over the wire protocol. It is a test
double, not a database: data lives in mongomock, in memory (or in a journal
with ``data_dir``), and only what the library and its tests need is
implemented.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import FakeReplicaSet

__all__ = ["FakeReplicaSet"]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``python -m mongo_events.testing.server`` does not import itself twice.
    if name == "FakeReplicaSet":
        try:
            import mongomock  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "FakeReplicaSet keeps its data in mongomock: pip install 'mongo-events[testing]'",
                name=exc.name,
            ) from exc
        from .server import FakeReplicaSet

        return FakeReplicaSet
    raise AttributeError(name)
