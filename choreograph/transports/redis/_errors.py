"""redis-py's exceptions: which are worth retrying, and the choreograph error each becomes."""

from __future__ import annotations

from redis import exceptions as rx

from choreograph.errors import ChoreographError, ConfigurationError, TransportError

RETRIED = (rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError)
"""Errors an operation is retried on (with backoff, up to ``reconnect_timeout``): the server is
away, restarting, loading its data, or was demoted in a failover."""
REFUSED = (rx.AuthenticationError, rx.AuthorizationError, rx.NoPermissionError)


def translate_error(exc: rx.RedisError) -> ChoreographError:
    """The choreograph error for a redis-py error: bad credentials or missing ACL permissions are
    configuration errors (retrying cannot fix them); everything else is a TransportError."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, rx.AuthenticationError):
        return ConfigurationError(f"Redis refused the credentials: {text}")
    if isinstance(exc, (rx.AuthorizationError, rx.NoPermissionError)):
        return ConfigurationError(
            f"the Redis user lacks a permission the transport needs: {text} "
            "(see docs/transport-redis.md, 'ACL')"
        )
    if isinstance(exc, rx.BusyLoadingError):
        return TransportError(f"Redis is still loading its data: {text}")
    if isinstance(exc, (rx.ConnectionError, rx.TimeoutError)):
        return TransportError(f"Redis unreachable: {text}")
    if isinstance(exc, rx.ReadOnlyError):
        return TransportError(f"Redis is a read-only replica (failover in progress?): {text}")
    if isinstance(exc, rx.OutOfMemoryError):
        return TransportError(f"Redis is out of memory (maxmemory reached): {text}")
    if isinstance(exc, rx.ResponseError):
        return TransportError(f"Redis refused the operation: {text}")
    return TransportError(f"Redis client error: {text}")
