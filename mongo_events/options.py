"""Checks for the options of :class:`mongo_events.Bus` and ``subscribe()``.

Every bad option is refused where it is given, with a :class:`ConfigurationError`
naming the option, the value and what is accepted: an option that slips through
fails later in a thread, where it can only stop the bus.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from .errors import ConfigurationError

__all__ = [
    "invalid",
    "check_choice",
    "check_int",
    "check_number",
    "check_has_method",
    "check_callable",
    "check_group_options",
]


def invalid(option: str, value: Any, accepted: str) -> ConfigurationError:
    """The error for ``option=value``: says what is accepted instead."""
    return ConfigurationError(f"{option}={_show(value)} is not valid: {option} must be {accepted}")


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a value whose repr() raises must not hide the real error
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= 200 else text[:197] + "..."


def check_choice(option: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` must be one of ``choices`` (compared by equality)."""
    allowed = list(choices)
    try:
        ok = value in allowed
    except TypeError:  # unhashable or odd comparisons: not one of ours
        ok = False
    if not ok:
        raise invalid(
            option, value, "one of " + ", ".join("None" if c is None else repr(str(c)) for c in allowed)
        )


def check_int(option: str, value: Any, minimum: int, *, allow_none: bool = False) -> None:
    """``value`` must be an ``int`` (not a ``bool``) of at least ``minimum``."""
    if value is None and allow_none:
        return
    if type(value) is bool or not isinstance(value, int) or value < minimum:
        none = " (or None)" if allow_none else ""
        raise invalid(option, value, f"an int of at least {minimum}{none}")


def check_number(option: str, value: Any, *, positive: bool = True) -> None:
    """``value`` must be an ``int`` or ``float`` (not a ``bool``), > 0 when ``positive``, else >= 0."""
    if (
        type(value) is bool
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or (value <= 0 if positive else value < 0)
    ):
        raise invalid(option, value, "a number of seconds " + ("> 0" if positive else ">= 0"))


def check_has_method(option: str, value: Any, method: str, what: str) -> None:
    """``value`` must have a callable ``method`` (a duck-typed hook such as a decoder)."""
    if not callable(getattr(value, method, None)):
        raise invalid(option, value, f"{what} (an object with a {method}() method)")


def check_callable(
    option: str, value: Any, what: str, *, allow_none: bool = True
) -> Callable[..., Any] | None:
    """``value`` must be callable (or ``None`` when allowed)."""
    if value is None and allow_none:
        return None
    if not callable(value):
        raise invalid(option, value, what)
    return value  # type: ignore[no-any-return]


#: The shortest ``lease_ttl`` a bus accepts: every lease call is bounded by ``lease_ttl / 6``
#: (83 ms here, a few round trips to a nearby server) and the member polls every
#: ``lease_ttl / 12``; below it a member never manages to join and only logs warnings.
MIN_LEASE_TTL = 0.5
#: The longest group name (it is part of every lease and checkpoint key).
MAX_GROUP_NAME = 100


def check_group_options(
    group: Any, partitions: Any, lease_ttl: Any, *, resume: bool = True, snapshot: Any = None
) -> None:
    """``Bus(group=, partitions=, lease_ttl=)``: a group name without ``:`` or ``/``, K >= 1, a ttl
    of at least :data:`MIN_LEASE_TTL`.

    ``partitions`` and ``lease_ttl`` are checked even without a group (a typo is never ignored).
    """
    if group is not None and (
        not isinstance(group, str)
        or not group
        or ":" in group
        or "/" in group
        or group != group.strip()  # "billing " would silently be a group of its own
        or not group.isprintable()
        or len(group) > MAX_GROUP_NAME
    ):
        raise invalid(
            "group",
            group,
            f"a non-empty printable str of at most {MAX_GROUP_NAME} characters, without ':' or '/' and "
            "without leading or trailing spaces, or None",
        )
    check_int("partitions", partitions, 1)
    check_number("lease_ttl", lease_ttl)
    if lease_ttl == math.inf:
        raise invalid("lease_ttl", lease_ttl, "a finite number of seconds > 0")
    if lease_ttl < MIN_LEASE_TTL:
        raise invalid(
            "lease_ttl",
            lease_ttl,
            f"at least {MIN_LEASE_TTL} s (each lease call gets lease_ttl / 6; below that a member cannot "
            "join or renew in time)",
        )
    if group is None and partitions != 1:
        raise ConfigurationError(
            f"partitions={partitions} splits the stream among the members of a consumer group: also pass group=..."
        )
    if group is not None and snapshot is not None and partitions > 1:
        raise ConfigurationError(
            "snapshot= reads every document, and each of the group's partitions would deliver all of them: "
            "use snapshot= with partitions=1 (active/standby), or run the snapshot from one bus without a group"
        )
    if group is not None and not resume:
        raise ConfigurationError(
            "group= needs stored positions (each partition has its own checkpoint): drop resume=False"
        )
