"""The server's ``configureFailPoint`` test command, with the ``failCommand`` fail point.

It behaves as MongoDB's does (``mongod --setParameter enableTestCommands=1``),
so a test written against it runs unchanged against a real replica set:

* ``mode``: ``"alwaysOn"``, ``"off"``, ``{times: n}``, ``{skip: n}``; a command
  counts towards ``times``/``skip`` only when it matches ``data``.
* ``data``: ``failCommands`` (required), ``appName`` (only connections whose
  handshake named that application), ``blockConnection`` with ``blockTimeMS``
  (delay first), ``closeConnection`` (drop the connection, no reply),
  ``errorCode`` (answer that error), ``errorLabels`` (exactly these labels;
  without it the server's own labels), ``writeConcernError`` (run the command,
  then add this write-concern error to its reply).
* The reply carries ``count``: how many times the fail point was entered before;
  ``{waitForFailPoint: "failCommand", timesEntered: n, maxTimeMS: ms}`` waits
  until it has been entered ``n`` times in all.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from .errors import CommandError

__all__ = ["Action", "FailPoints"]

#: Commands ``failCommand`` never fails (as on a real server, it cannot lock itself out).
_NEVER_FAILED = frozenset({"configureFailPoint", "mongoEventsFake"})


@dataclass
class Action:
    """What an activated ``failCommand`` does to one command."""

    block_seconds: float = 0.0
    close_connection: bool = False
    error_code: int | None = None
    error_labels: list[str] | None = None
    write_concern_error: dict[str, Any] | None = None


@dataclass
class _FailCommand:
    mode: str = "off"  # "alwaysOn" | "times" | "skip" | "off"
    remaining: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    entered: int = 0


class FailPoints:
    """Fail-point state for one fake server. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._fail_command = _FailCommand()
        self._entered_total = 0

    def wait(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer ``{waitForFailPoint: "failCommand", timesEntered: n, maxTimeMS: ms}``."""
        if body.get("waitForFailPoint") != "failCommand":
            raise CommandError(2, "BadValue", f"Cannot find failpoint: {body.get('waitForFailPoint')}")
        target = int(body.get("timesEntered", 1))
        timeout = float(body.get("maxTimeMS", 0)) / 1000.0
        with self._lock:
            if not self._lock.wait_for(
                lambda: self._entered_total >= target, timeout if timeout > 0 else None
            ):
                raise CommandError(50, "MaxTimeMSExpired", "operation exceeded time limit")
        return {}

    def configure(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer ``{configureFailPoint: name, mode, data}``."""
        name = body.get("configureFailPoint")
        if name != "failCommand":
            raise CommandError(
                2, "BadValue", f"Cannot find failpoint: {name} (the fake replica set supports failCommand)"
            )
        mode, remaining = _parse_mode(body.get("mode"))
        data = body.get("data") or {}
        if not isinstance(data, dict):
            raise CommandError(14, "TypeMismatch", "'data' must be an object")
        if mode != "off":
            commands = data.get("failCommands")
            if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
                raise CommandError(
                    2, "BadValue", "failCommand requires 'failCommands', an array of command names"
                )
        with self._lock:
            count = self._entered_total
            self._fail_command = _FailCommand(mode, remaining, dict(data))
        return {"count": count}

    def check(self, name: str, app_name: str | None) -> Action | None:
        """The action for command ``name`` on a connection from ``app_name``, if the fail point fires."""
        with self._lock:
            fp = self._fail_command
            if fp.mode == "off" or name in _NEVER_FAILED:
                return None
            data = fp.data
            if name not in data.get("failCommands", ()):
                return None
            if "appName" in data and data["appName"] != app_name:
                return None
            if fp.mode == "skip":
                if fp.remaining > 0:
                    fp.remaining -= 1
                    return None
            elif fp.mode == "times":
                if fp.remaining <= 0:
                    fp.mode = "off"
                    return None
                fp.remaining -= 1
                if fp.remaining == 0:
                    fp.mode = "off"
            fp.entered += 1
            self._entered_total += 1
            self._lock.notify_all()
        labels = data.get("errorLabels")
        return Action(
            block_seconds=float(data.get("blockTimeMS", 0)) / 1000.0 if data.get("blockConnection") else 0.0,
            close_connection=bool(data.get("closeConnection")),
            error_code=int(data["errorCode"]) if "errorCode" in data else None,
            error_labels=[str(label) for label in labels] if isinstance(labels, list) else None,
            write_concern_error=dict(data["writeConcernError"])
            if isinstance(data.get("writeConcernError"), dict)
            else None,
        )


def _parse_mode(mode: Any) -> tuple[str, int]:
    if mode in ("alwaysOn", "off"):
        return str(mode), 0
    if isinstance(mode, dict) and len(mode) == 1:
        ((key, value),) = mode.items()
        if key in ("times", "skip") and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            if key == "times" and value == 0:
                return "off", 0
            return key, value
    raise CommandError(
        2,
        "BadValue",
        f"invalid fail point mode: {mode!r} (use 'alwaysOn', 'off', {{times: n}} or {{skip: n}})",
    )
