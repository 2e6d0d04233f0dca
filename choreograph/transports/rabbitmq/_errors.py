"""aiormq's exceptions, translated into choreograph's (one table, tested row by row)."""

from __future__ import annotations

import aiormq.exceptions as amqp_errors

from choreograph.errors import ChoreographError, ConfigurationError, TransportError

ERROR_TABLE: tuple[tuple[type[BaseException], type[ChoreographError], str], ...] = (
    (amqp_errors.ProbableAuthenticationError, ConfigurationError, "authentication failed"),
    (amqp_errors.AuthenticationError, ConfigurationError, "authentication failed"),
    (amqp_errors.IncompatibleProtocolError, ConfigurationError, "not an AMQP 0-9-1 server"),
    (amqp_errors.ConnectionNotAllowed, ConfigurationError, "connection refused (vhost? rights?)"),
    (amqp_errors.ChannelAccessRefused, ConfigurationError, "access refused (user permissions)"),
    (
        amqp_errors.ChannelPreconditionFailed,
        ConfigurationError,
        "it exists with other arguments (created by another version or by hand?)",
    ),
    (amqp_errors.ChannelNotFoundEntity, TransportError, "not found on the broker"),
    (amqp_errors.ChannelLockedResource, TransportError, "locked by another connection"),
    (amqp_errors.PublishError, TransportError, "unroutable: returned by the broker"),
    (amqp_errors.DeliveryError, TransportError, "refused by the broker (negative confirm)"),
    (amqp_errors.AMQPConnectionError, TransportError, "connection lost or refused"),
    (amqp_errors.AMQPError, TransportError, "AMQP error"),
    (amqp_errors.ChannelInvalidStateError, TransportError, "channel closed"),
    (TimeoutError, TransportError, "timed out"),
    (OSError, TransportError, "network error"),
)
"""How AMQP client errors become choreograph errors: the first matching row wins."""


def translate(exc: BaseException, doing: str) -> ChoreographError:
    """The choreograph error for ``exc`` raised while ``doing`` something."""
    if isinstance(exc, ChoreographError):
        return exc
    for kind, into, what in ERROR_TABLE:
        if isinstance(exc, kind):
            return into(f"RabbitMQ: {doing}: {what} ({type(exc).__name__}: {exc})")
    return TransportError(f"RabbitMQ: {doing}: {type(exc).__name__}: {exc}")
