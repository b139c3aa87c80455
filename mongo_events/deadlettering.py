"""Dead-lettering beside the dispatcher: the hook it calls when a subscription gives up.

The dispatcher calls a :class:`~mongo_events.dispatch.DeadLetterHook`; this module builds
the one a bus passes: a :class:`DeadLetter` record written to a :class:`DeadLetterStore`
(or the user's own function), reporting its failures to ``on_error``. The stream consumer
uses the same hook for an oversize event it could only fetch as a stub.
:func:`replay` delivers a stored dead letter once more, through the same callback path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone

from bson import ObjectId

from .decoding import Decoder
from .delivery import Delivery
from .dispatch import DeadLetterHook, call_subscription
from .errors import ConfigurationError, Skip
from .events import ChangeEvent
from .middleware.base import Middleware
from .reporting import ErrorContext, ErrorHandler, report_error
from .stores.base import DeadLetterStore
from .stores.records import DeadLetter
from .subscription import Subscription

__all__ = ["dead_letter_hook", "replay"]


def dead_letter_hook(
    target: DeadLetterStore | DeadLetterHook | None,
    *,
    bus_name: str,
    resume_token_key: str,
    on_error: ErrorHandler | None,
    on_outcome: Callable[[BaseException | None], None] | None = None,
) -> DeadLetterHook | None:
    """The hook that dead-letters for a bus: into ``target`` (a store or a function), or ``None``.

    With ``on_error``, a failure to store is reported (kind ``dead_letter``) before it
    propagates to the dispatcher, which retries the write. ``on_outcome`` hears every
    write's outcome (the error, or ``None`` once one succeeded), so the bus's health can
    say that a failing dead-letter store holds its window shut.
    """
    if target is None:
        return None
    hook: DeadLetterHook
    if isinstance(target, DeadLetterStore):
        hook = _StoreDeadLetter(target, bus_name, resume_token_key)
    else:
        hook = target
    if on_error is None and on_outcome is None:
        return hook
    inner = hook

    def store(event: ChangeEvent, subscription: str, error: BaseException, attempts: int) -> None:
        try:
            inner(event, subscription, error, attempts)
        except Exception as exc:
            if on_error is not None:
                report_error(
                    on_error,
                    exc,
                    ErrorContext(
                        "dead_letter", bus_name, subscription, event.id, attempts, "store dead letter"
                    ),
                )
            if on_outcome is not None:
                on_outcome(exc)
            raise
        if on_outcome is not None:
            on_outcome(None)

    return store


class _StoreDeadLetter:
    """Writes a :class:`DeadLetter` (Go's shape) for each event given up on."""

    def __init__(self, store: DeadLetterStore, bus_name: str, resume_token_key: str) -> None:
        self._store = store
        self._bus_name = bus_name
        self._key = resume_token_key

    def __call__(self, event: ChangeEvent, subscription: str, error: BaseException, attempts: int) -> None:
        self._store.store(
            DeadLetter(
                id=str(ObjectId()),
                event_name=subscription,
                original_id=event.id,
                payload=dict(event.raw),
                metadata={
                    "bus": self._bus_name,
                    "namespace": event.namespace,
                    "operation": str(event.operation_type),
                    "document_key": event.document_key,
                    "cluster_time": event.cluster_time,
                    "resume_token_key": self._key,
                },
                error=f"{type(error).__name__}: {error}",
                retry_count=attempts - 1,  # retries, as in the monitor entry (and Go's RetryCount)
                source=self._bus_name,
                created_at=datetime.now(timezone.utc),
            )
        )


def replay(
    letter: DeadLetter,
    subscriptions: Sequence[Subscription],
    *,
    bus_name: str,
    decoder: Decoder,
    middleware: Sequence[Middleware],
    default_db: str,
    default_coll: str | None,
    update_description: bool,
) -> BaseException | None:
    """Deliver ``letter`` once more through its subscription, on the caller's thread
    (``Bus.replay``); returns the callback's exception, if any.

    :raises ConfigurationError: when no subscription has the letter's ``event_name``.
    """
    sub = next((s for s in subscriptions if s.name == letter.event_name), None)
    if sub is None:
        raise ConfigurationError(
            f"bus {bus_name!r} has no subscription {letter.event_name!r} to replay dead letter {letter.id}"
        )
    event = ChangeEvent.from_raw(letter.payload, default_db, default_coll)
    delivery = Delivery(
        event=event,
        subscription=sub.name,
        attempt=letter.replay_count + 1,
        update_description=event.update_description if update_description else None,
        cluster_time=event.cluster_time,
        bus=bus_name,
        replay=True,
        original_error=letter.error,
    )
    error = call_subscription(sub, event, delivery, decoder, middleware)
    return None if isinstance(error, Skip) else error  # a skipped replay (a duplicate) is done
