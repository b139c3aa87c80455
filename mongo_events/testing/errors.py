"""Errors the fake replica set answers with, and the error labels a server attaches."""

from __future__ import annotations

from typing import Any

__all__ = ["CODE_NAMES", "CommandError", "code_name", "server_labels"]

#: Codes in MongoDB's ``RetriableError`` category (``src/mongo/base/error_codes.yml``).
RETRIABLE = frozenset(
    {6, 7, 89, 91, 134, 189, 262, 358, 402, 406, 407, 412, 9001, 10107, 11600, 11602, 13435, 13436}
)
#: Codes in the ``NetworkError`` and ``NeedRetargettingError`` categories, plus the two named ones.
_RESUMABLE_EXTRA = frozenset({6, 7, 89, 9001, 63, 150, 13388, 234, 133})
#: Codes in the ``NonResumableChangeStreamError`` category.
NON_RESUMABLE = frozenset({280, 286})
_TRANSIENT = frozenset({112, 24, 267, 239, 246, 250, 272, 251, 150, 13388, 249})

CODE_NAMES = {
    2: "BadValue",
    6: "HostUnreachable",
    7: "HostNotFound",
    13: "Unauthorized",
    18: "AuthenticationFailed",
    43: "CursorNotFound",
    47: "NoMatchingDocument",
    59: "CommandNotFound",
    64: "WriteConcernTimeout",
    72: "InvalidOptions",
    89: "NetworkTimeout",
    91: "ShutdownInProgress",
    100: "UnsatisfiableWriteConcern",
    112: "WriteConflict",
    189: "PrimarySteppedDown",
    260: "InvalidResumeToken",
    262: "ExceededTimeLimit",
    263: "OperationNotSupportedInTransaction",
    280: "ChangeStreamFatalError",
    286: "ChangeStreamHistoryLost",
    9001: "SocketException",
    10107: "NotWritablePrimary",
    10334: "BSONObjectTooLarge",
    11600: "InterruptedAtShutdown",
    11601: "Interrupted",
    11602: "InterruptedDueToReplStateChange",
    13435: "NotPrimaryNoSecondaryOk",
    13436: "NotPrimaryOrSecondary",
}


def code_name(code: int) -> str:
    """The server's name for ``code`` (``Location<code>`` for the numbered assertions)."""
    return CODE_NAMES.get(code, f"Location{code}")


class CommandError(Exception):
    """A command failure, rendered as ``{ok: 0, code, codeName, errmsg}``.

    ``labels=None`` lets the server attach the labels a real one would
    (:func:`server_labels`); a list, even empty, is sent exactly.
    """

    def __init__(self, code: int, code_name: str, message: str, labels: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.code_name = code_name
        self.message = message
        self.labels = labels

    def to_reply(self) -> dict[str, Any]:
        reply: dict[str, Any] = {
            "ok": 0.0,
            "errmsg": self.message,
            "code": self.code,
            "codeName": self.code_name,
        }
        if self.labels:
            reply["errorLabels"] = list(self.labels)
        return reply


def _is_change_stream(body: dict[str, Any]) -> bool:
    pipeline = body.get("pipeline")
    return (
        isinstance(pipeline, list)
        and bool(pipeline)
        and isinstance(pipeline[0], dict)
        and "$changeStream" in pipeline[0]
    )


def server_labels(name: str, body: dict[str, Any], code: int | None, wc_code: int | None = None) -> list[str]:
    """The ``errorLabels`` MongoDB's ``ErrorLabelBuilder`` attaches to an error reply.

    A ``getMore`` gets ``ResumableChangeStreamError`` only when the server knows
    its originating ``aggregate``; this function sees just the ``getMore``, so
    callers that do know (the change-stream cursor itself) pass the label.
    """
    labels: list[str] = []
    in_txn = "txnNumber" in body and "autocommit" in body
    retryable_write = "txnNumber" in body and "autocommit" not in body
    commit_or_abort = name in ("commitTransaction", "abortTransaction")
    if in_txn and code is not None and (code in _TRANSIENT or (code in RETRIABLE and not commit_or_abort)):
        labels.append("TransientTransactionError")
    elif (retryable_write or (in_txn and commit_or_abort)) and (
        (code in RETRIABLE) or (wc_code in RETRIABLE)
    ):
        labels.append("RetryableWriteError")
    if labels:
        return labels
    if (
        name == "aggregate"
        and code is not None
        and wc_code is None
        and (code in RETRIABLE or code in _RESUMABLE_EXTRA)
        and _is_change_stream(body)
    ):
        labels.append("ResumableChangeStreamError")
    elif code in NON_RESUMABLE:
        labels.append("NonResumableChangeStreamError")
    return labels
