"""Aggregation expressions the fake replica set adds to mongomock's evaluator.

- ``$$NOW``: the fake server's clock (UTC, millisecond precision), as in a real server's
  queries and update pipelines (MongoDB 4.2+), and like a server's, one value for the whole
  command (:func:`one_clock`): read again at every evaluation, the conditions of one update
  pipeline could disagree about an expiry and write half of a claim. mongomock alone
  resolves it to nothing and silently matches no document.
- ``$toHashedIndexKey``: MongoDB's hashed-index hash (see
  :func:`mongo_events.groups.partitioning.hashed_index_key`); a missing value hashes as null.
- ``$mod`` with the remainder's sign following the dividend, as on a server (mongomock uses
  Python's ``%``, whose sign follows the divisor).

Installed once, when the fake's backend is imported.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import threading
from collections.abc import Iterator
from typing import Any

import mongomock as _mongomock

mongomock: Any = _mongomock


_command = threading.local()  # the clock of the command this thread runs (see one_clock)


def server_now() -> datetime.datetime:
    """The fake server's ``$$NOW``: naive UTC, truncated to milliseconds like a BSON date.

    Inside :func:`one_clock`, the value it fixed for the command.
    """
    fixed: datetime.datetime | None = getattr(_command, "now", None)
    if fixed is not None:
        return fixed
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


@contextlib.contextmanager
def one_clock() -> Iterator[datetime.datetime]:
    """Fix ``$$NOW`` for one command, as a server does (the same value in every stage and
    expression of it). Nested uses keep the outer value."""
    if getattr(_command, "now", None) is not None:
        yield _command.now
        return
    _command.now = server_now()
    try:
        yield _command.now
    finally:
        _command.now = None


def install() -> None:
    """Teach mongomock's expression parser ``$$NOW``, ``$toHashedIndexKey`` and the server's ``$mod``."""
    parser_cls = mongomock.aggregate._Parser
    if getattr(parser_cls, "_mongo_events_expressions", False):
        return
    basic = parser_cls._parse_basic_expression
    parse = parser_cls.parse

    def _parse_basic_expression(self: Any, expression: Any) -> Any:
        if expression == "$$NOW":
            return server_now()
        return basic(self, expression)

    def _parse(self: Any, expression: Any) -> Any:
        if isinstance(expression, dict) and len(expression) == 1:
            ((name, argument),) = expression.items()
            if name == "$toHashedIndexKey":
                from ..groups.partitioning import hashed_index_key

                try:
                    value = self.parse(argument)
                except KeyError:
                    value = None
                return hashed_index_key(value)
            if name == "$mod" and isinstance(argument, list) and len(argument) == 2:
                dividend, divisor = self.parse_many(argument)
                if dividend is None or divisor is None:
                    return None
                if isinstance(dividend, int) and isinstance(divisor, int):
                    if not divisor:
                        return _zero_divisor()
                    remainder = abs(dividend) % abs(divisor)
                    return -remainder if dividend < 0 else remainder
                return math.fmod(dividend, divisor)
        return parse(self, expression)

    parser_cls._parse_basic_expression = _parse_basic_expression
    parser_cls.parse = _parse
    collection_cls = mongomock.collection.Collection
    for name in _ONE_CLOCK_METHODS:
        setattr(collection_cls, name, _under_one_clock(getattr(collection_cls, name)))
    parser_cls._mongo_events_expressions = True


#: mongomock collection methods that evaluate a query or an update: one ``$$NOW`` each.
_ONE_CLOCK_METHODS = (
    "find_one",
    "count_documents",
    "aggregate",
    "update_one",
    "update_many",
    "replace_one",
    "delete_one",
    "delete_many",
    "find_one_and_update",
    "find_one_and_replace",
    "find_one_and_delete",
)


def _under_one_clock(method: Any) -> Any:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with one_clock():
            return method(*args, **kwargs)

    return call


def _zero_divisor() -> Any:
    raise mongomock.OperationFailure("can't $mod by zero", 16610)
