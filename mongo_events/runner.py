"""What the runners share: logging when the application set none up, and the exit summary.

The library itself never configures logging (``mongo_events`` has a
``NullHandler``). The *runners* do, a little: ``Bus.run_forever()``, the
``mongo-events`` command, ``flask mongo-events run``, ``manage.py
run_mongo_events`` and ``mongo-events monitor serve`` call :func:`ensure_logging`,
so a bus that fails in a process whose application configured no logging still
prints why on stderr.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["ensure_logging", "exit_summary"]

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _RunnerHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler :func:`ensure_logging` installs (a class of its own, to find it again)."""


def _configured(logger: logging.Logger) -> bool:
    """Whether a handler other than a ``NullHandler`` would see ``logger``'s records."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def ensure_logging(level: int = logging.INFO) -> bool:
    """Log ``mongo_events`` records at ``level`` to stderr, unless the application configured logging.

    Nothing changes when a handler (other than a ``NullHandler``) already sees the
    ``mongo_events`` logger's records, e.g. after ``logging.basicConfig()``, Django's
    ``LOGGING`` or Flask's own set-up of the root logger. Calling it twice is harmless.

    :param level: the level of the installed handler and of the ``mongo_events`` logger
        (when that logger has no level of its own).
    :returns: whether a handler was installed.

    .. versionadded:: 0.1.0
    """
    logger = logging.getLogger("mongo_events")
    if _configured(logger):
        return False
    handler = _RunnerHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(level)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    return True


def exit_summary(bus: Any, error: BaseException | str) -> str:
    """The one line a runner prints on stderr when a bus ends it: the bus's name and the error.

    :param bus: a :class:`~mongo_events.Bus`, its name, or ``None`` when no bus was built
        (the error then names the configuration at fault).
    """
    text = error if isinstance(error, str) else (str(error) or type(error).__name__)
    if bus is None:
        return f"mongo-events: {text}".replace("\n", " ")
    return f"mongo-events: bus {getattr(bus, 'name', bus)} failed: {text}".replace("\n", " ")
