"""Aggregation expressions the fake replica set adds to mongomock's evaluator.

- ``$$NOW``: the fake server's clock (UTC, millisecond precision), as in a real server's
  queries and update pipelines (MongoDB 4.2+). mongomock alone resolves it to nothing and
  silently matches no document.
- ``$toHashedIndexKey``: MongoDB's hashed-index hash (see
  :func:`mongo_events.groups.partitioning.hashed_index_key`); a missing value hashes as null.
- ``$mod`` with the remainder's sign following the dividend, as on a server (mongomock uses
  Python's ``%``, whose sign follows the divisor).

Installed once, when the fake's backend is imported.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

import mongomock as _mongomock

mongomock: Any = _mongomock


def server_now() -> datetime.datetime:
    """The fake server's ``$$NOW``: naive UTC, truncated to milliseconds like a BSON date."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


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
    parser_cls._mongo_events_expressions = True


def _zero_divisor() -> Any:
    raise mongomock.OperationFailure("can't $mod by zero", 16610)
