"""Resume tokens in a local JSON file, for apps whose watched database is read-only."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from bson import json_util
from bson.timestamp import Timestamp

from ..errors import StoreError
from .base import Checkpoint, ResumeTokenStore, malformed, stored_checkpoint

__all__ = ["FileResumeTokenStore"]

_JSON = json_util.CANONICAL_JSON_OPTIONS


class FileResumeTokenStore(ResumeTokenStore):
    """One JSON file (canonical Extended JSON) mapping keys to checkpoints.

    Each save writes a temporary file, fsyncs it and renames it over the old one,
    so a crash leaves either the old or the new position, never a torn file.
    The file belongs to one process: do not share it between machines.

    .. versionadded:: 0.1.0
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json_util.loads(fh.read(), json_options=_JSON)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"could not read resume tokens from {self.path}: {exc}") from exc
        if not isinstance(data, dict):
            raise StoreError(f"{self.path} does not hold a JSON object of resume tokens")
        return data

    def _write(self, data: Mapping[str, Any]) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tokens-", dir=directory)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json_util.dumps(data, json_options=_JSON))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            raise StoreError(f"could not write resume tokens to {self.path}: {exc}") from exc

    def load(self, key: str) -> Checkpoint | None:
        with self._lock:
            data = self._read()
        if key not in data:
            return None
        entry = data[key]
        if not isinstance(entry, dict):
            raise malformed(key, self.path, f"its entry is {entry!r}, not an object with a token")
        return stored_checkpoint(entry, key, self.path)

    def save(
        self,
        key: str,
        token: Mapping[str, Any],
        cluster_time: Timestamp | None = None,
        *,
        namespace: str | None = None,
        level: str | None = None,
    ) -> None:
        from ..snapshot import stored_fields

        stored, snapshot = stored_fields(token)  # snapshot progress goes beside the token
        entry: dict[str, Any] = {
            "token": stored,
            "cluster_time": cluster_time,
            "updated_at": datetime.now(timezone.utc),
        }
        if snapshot is not None:
            entry["snapshot"] = snapshot
        if namespace is not None:
            entry["namespace"] = namespace
        if level is not None:
            entry["level"] = level
        with self._lock:
            data = self._read()
            data[key] = entry
            self._write(data)

    def delete(self, key: str) -> None:
        with self._lock:
            data = self._read()
            if key in data:  # a malformed (null) entry too: deleting is how an operator repairs it
                del data[key]
                self._write(data)
