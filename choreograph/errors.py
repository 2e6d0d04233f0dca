"""The exceptions of choreograph, in one tree.

::

    ChoreographError
    ├── ConfigurationError          bad URL, setting or declaration; raised at start-up
    ├── TransportError              the bus cannot be reached or refused an operation (transient)
    ├── InvalidMessage              can never be handled: dead-lettered, never retried
    │   ├── MalformedEnvelope       not JSON, or not a CloudEvents 1.0 structured event
    │   ├── UnknownEventType        no handler of this service knows the type
    │   ├── SchemaViolation         the data does not match the declared event class
    │   ├── TopicMismatch           its topic and its ``type`` differ
    │   └── PayloadTooLarge         over the documented size limit
    └── HandlingError               raised by handlers on purpose
        ├── RetryLater              transient: try again later (optionally after ``delay``)
        └── PermanentFailure        hopeless: no retry; dead-letter and announce the failure

Any other exception escaping a handler is treated as transient and retried by the service's
retry policy until its attempts run out.
"""

from __future__ import annotations


class ChoreographError(Exception):
    """Base of every error raised by choreograph."""


class ConfigurationError(ChoreographError):
    """A setting, URL or declaration is wrong. Raised before anything runs."""


class TransportError(ChoreographError):
    """The bus could not complete an operation. Callers may retry it."""


class InvalidMessage(ChoreographError):
    """A message that no retry can fix; it goes to the dead-letter queue with this reason."""

    reason = "invalid message"


class MalformedEnvelope(InvalidMessage):
    reason = "malformed envelope"


class UnknownEventType(InvalidMessage):
    reason = "unknown event type"


class SchemaViolation(InvalidMessage):
    reason = "schema violation"


class TopicMismatch(InvalidMessage):
    """An event that came on another type's topic: never routed by its ``type`` alone."""

    reason = "topic and type disagree"


class PayloadTooLarge(InvalidMessage):
    reason = "payload too large"


class HandlingError(ChoreographError):
    """Base of the exceptions a handler raises on purpose to steer what happens next."""


class RetryLater(HandlingError):
    """Transient failure: handle this event again later.

    ``delay`` (seconds) overrides the retry policy's backoff for this attempt. The attempt still
    counts against the policy's ``max_attempts``.
    """

    def __init__(self, message: str = "retry later", *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentFailure(HandlingError):
    """The event can never be handled successfully: no retry.

    The event is dead-lettered with this message as its reason, and a ``HandlerFailed`` event is
    published so that other services can compensate.
    """
