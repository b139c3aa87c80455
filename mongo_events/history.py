"""Going back in the oplog: rewinding a checkpoint to a time, and "all available history".

A rewind stores a *rewind marker* as the checkpoint: a token whose ``_data`` names a
cluster time. The next start opens the stream there with ``startAtOperationTime``
instead of resuming after a token. Any store keeps it (it is a plain string), and a
version that does not know it fails loudly when the server refuses it as a token.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import attrs
from bson.timestamp import Timestamp
from pymongo import MongoClient

from .errors import ConfigurationError

__all__ = ["RewindPlan", "oplog_oldest", "plan_rewind", "rewind_time", "rewind_token", "to_timestamp"]

_PREFIX = "mongo-events:start-at:"

#: Stop counting oplog entries after this many (the dry run says "at least").
COUNT_CAP = 1_000_000


def rewind_token(ts: Timestamp) -> dict[str, str]:
    """The checkpoint token that makes the next start begin at cluster time ``ts``."""
    return {"_data": f"{_PREFIX}{ts.time}:{ts.inc}"}


def rewind_time(token: Any) -> Timestamp | None:
    """The cluster time of a rewind marker, or ``None`` for an ordinary resume token."""
    if not isinstance(token, Mapping):
        return None
    data = token.get("_data")
    if not isinstance(data, str) or not data.startswith(_PREFIX):
        return None
    seconds, _, inc = data[len(_PREFIX) :].partition(":")
    try:
        return Timestamp(int(seconds), int(inc or 0))
    except (ValueError, TypeError, OverflowError):
        return None


def to_timestamp(to: datetime | Timestamp) -> Timestamp:
    """A cluster time from a ``Timestamp`` or a datetime (naive means UTC).

    :raises ConfigurationError: for anything else.
    """
    if isinstance(to, Timestamp):
        return to
    if isinstance(to, datetime):
        if to.tzinfo is None:
            to = to.replace(tzinfo=timezone.utc)
        return Timestamp(max(0, int(to.timestamp())), 0)
    raise ConfigurationError(f"rewind(to=...) needs a datetime or a bson Timestamp, got {type(to).__name__}")


def oplog_oldest(client: MongoClient[Any]) -> Timestamp:
    """Cluster time of the oldest entry still in the oplog.

    :raises ConfigurationError: when ``local.oplog.rs`` cannot be read or is empty.
    """
    try:
        doc = client["local"]["oplog.rs"].find_one({}, sort=[("$natural", 1)], projection={"ts": 1})
    except Exception as exc:
        raise ConfigurationError(
            f"cannot read local.oplog.rs to find the oldest oplog entry ({exc}): the user needs read access "
            "to the local database (the clusterMonitor role), and the deployment must be a replica set"
        ) from exc
    ts = doc.get("ts") if doc else None
    if not isinstance(ts, Timestamp):
        raise ConfigurationError("local.oplog.rs has no entries: there is no history to start from")
    return ts


@attrs.frozen
class RewindPlan:
    """Where a rewind goes, and what the oplog holds after it.

    :ivar to: the cluster time the stream will start at.
    :ivar oldest: the oldest oplog entry's time.
    :ivar seconds_back: how far before now ``to`` is.
    :ivar entries: oplog entries at or after ``to`` (all namespaces), counted up to :data:`COUNT_CAP`.
    :ivar capped: True when counting stopped at the cap (there are at least ``entries``).
    """

    to: Timestamp
    oldest: Timestamp
    seconds_back: float
    entries: int
    capped: bool


def plan_rewind(client: MongoClient[Any], to: datetime | Timestamp, *, count: bool = True) -> RewindPlan:
    """Check that the oplog still reaches back to ``to``; count what follows it.

    :raises ConfigurationError: when ``to`` is older than the oldest oplog entry (the
        message names that entry's time), or the oplog cannot be read.
    """
    ts = to_timestamp(to)
    oldest = oplog_oldest(client)
    if isinstance(to, datetime) and ts.time == oldest.time:
        ts = oldest  # a datetime names a whole second: start at its oldest entry still there
    if (ts.time, ts.inc) < (oldest.time, oldest.inc):
        raise ConfigurationError(
            f"cannot rewind to {_iso(ts)}: the oplog's oldest entry is from {_iso(oldest)} ({oldest}); "
            "everything before that is gone. Pick a time at or after it"
        )
    entries, capped = 0, False
    if count:
        cursor = client["local"]["oplog.rs"].find({}, projection={"ts": 1}, sort=[("$natural", -1)])
        for doc in cursor:
            entry_ts = doc.get("ts")
            if isinstance(entry_ts, Timestamp) and (entry_ts.time, entry_ts.inc) < (ts.time, ts.inc):
                break
            entries += 1
            if entries >= COUNT_CAP:
                capped = True
                break
        cursor.close()
    seconds_back = max(0.0, datetime.now(timezone.utc).timestamp() - ts.time)
    return RewindPlan(to=ts, oldest=oldest, seconds_back=seconds_back, entries=entries, capped=capped)


def _iso(ts: Timestamp) -> str:
    return datetime.fromtimestamp(ts.time, timezone.utc).isoformat().replace("+00:00", "Z")
