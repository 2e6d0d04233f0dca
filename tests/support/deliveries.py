"""Deliveries of events as a bus hands them to a handling, for tests that call it directly."""

from __future__ import annotations

from choreograph import Event
from choreograph.envelope import encode, new_envelope
from choreograph.transport import Delivery, Message


def delivery(event: Event, correlation_id: str, event_id: str = "") -> Delivery:
    """``event`` in transaction ``correlation_id`` (with id ``event_id`` when given), attempt 1."""
    envelope = new_envelope(event.event_type, event.to_data(), source="t",
                            correlation_id=correlation_id)  # fmt: skip
    if event_id:
        envelope = envelope.evolve(id=event_id)
    return Delivery(Message(envelope.id, envelope.type, encode(envelope)), 1)
