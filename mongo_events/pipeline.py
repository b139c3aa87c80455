"""Ready-made change-stream pipeline stages (pass them in ``Bus(pipeline=[...])``)."""

from __future__ import annotations

from typing import Any

from .errors import ConfigurationError

__all__ = ["collection_filter"]


def collection_filter(*collections: str, database: str | None = None) -> dict[str, Any]:
    """The ``$match`` stage that keeps the changes of some collections only.

    For a database bus that should see a few of its collections (Go's
    ``CollectionFilterPipeline``); the server drops the other changes, so they cost
    no network or callbacks. With ``database``, a cluster bus keeps those
    collections of that database only::

        bus = me.Bus(client.shop, pipeline=[me.collection_filter("orders", "customers")])

    :param collections: collection names (at least one).
    :param database: also require this database (``ns.db``).
    :raises ConfigurationError: when no collection is given (Go returns an empty pipeline,
        which watches everything; here that is an error, not a silent widening).

    .. versionadded:: 0.1.0
    """
    names = list(collections)
    if not names:
        raise ConfigurationError("collection_filter needs at least one collection name")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"collection names must be non-empty strings, got {name!r}")
    match: dict[str, Any] = {}
    if database is not None:
        if not database:
            raise ConfigurationError("database must be a non-empty name (or None for any database)")
        match["ns.db"] = database
    match["ns.coll"] = {"$in": names}
    return {"$match": match}
