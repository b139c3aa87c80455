"""What a callback learns about the delivery it is handling."""

from __future__ import annotations

import contextvars
from collections.abc import Callable

import attrs
from bson.timestamp import Timestamp

from .events import ChangeEvent, UpdateDescription

__all__ = ["Delivery", "current_delivery"]


@attrs.frozen
class Delivery:
    """One attempt to deliver an event to one subscription.

    :ivar event: the change event.
    :ivar subscription: the subscription's name.
    :ivar attempt: 1 for the first try, 2 for the first retry, and so on.
    :ivar update_description: the update's description when the bus has ``update_description``
        (or ``max_updated_fields_size``) on and the event is an update; else ``None``.
    :ivar cluster_time: the event's cluster time.
    :ivar bus: the bus's name.
    :ivar replay: ``True`` when a dead letter is being replayed.
    :ivar original_error: the error recorded with the dead letter being replayed.
    """

    event: ChangeEvent
    subscription: str
    attempt: int
    update_description: UpdateDescription | None
    cluster_time: Timestamp | None
    bus: str = ""
    replay: bool = False
    original_error: str | None = None

    @property
    def event_id(self) -> str:
        return self.event.id

    def with_attempt(self, attempt: int) -> Delivery:
        return attrs.evolve(self, attempt=attempt)


#: The delivery being handled, or a function that builds it: most callbacks never ask,
#: so the dispatcher only builds a Delivery when someone does (saves a frozen attrs
#: instance per attempt on the hot path).
_Current = Delivery | Callable[[], Delivery] | None
_current: contextvars.ContextVar[_Current] = contextvars.ContextVar("mongo_events_delivery", default=None)


def current_delivery() -> Delivery | None:
    """The :class:`Delivery` being handled by this thread's callback, or ``None`` outside one."""
    value = _current.get()
    if value is None or isinstance(value, Delivery):
        return value
    delivery = value()
    _current.set(delivery)  # undone with the rest when the attempt resets the variable
    return delivery
