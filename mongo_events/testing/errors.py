"""Errors the fake replica set answers with."""

from __future__ import annotations

from typing import Any

__all__ = ["CommandError"]


class CommandError(Exception):
    """A command failure, rendered as ``{ok: 0, code, codeName, errmsg}``."""

    def __init__(self, code: int, code_name: str, message: str, labels: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.code_name = code_name
        self.message = message
        self.labels = labels or []

    def to_reply(self) -> dict[str, Any]:
        reply: dict[str, Any] = {"ok": 0.0, "errmsg": self.message, "code": self.code, "codeName": self.code_name}
        if self.labels:
            reply["errorLabels"] = list(self.labels)
        return reply
