"""nats-py's exceptions, translated into choreograph's (one table, tested row by row)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import nats.errors as ne
import nats.js.errors as jse

from choreograph.errors import ChoreographError, ConfigurationError, TransportError

# (nats-py exception types, choreograph exception, what it means); the first match wins, so the
# more specific types come first.
ERROR_TABLE: list[tuple[tuple[type[BaseException], ...], type[ChoreographError], str]] = [
    (
        (ne.AuthorizationError, ne.InvalidUserCredentialsError),
        ConfigurationError,
        "the server refused the credentials",
    ),
    (
        (ne.SecureConnRequiredError, ne.SecureConnWantedError),
        ConfigurationError,
        "TLS is required on one side and not enabled on the other",
    ),
    (
        (ssl.SSLCertVerificationError,),
        ConfigurationError,
        "the server's TLS certificate was not accepted (tls_ca_file? tls_verify?)",
    ),
    (
        (jse.ServiceUnavailableError, jse.NoStreamResponseError, ne.NoRespondersError),
        TransportError,
        "JetStream did not answer (starting, recovering, or not enabled)",
    ),
    ((jse.NotFoundError,), TransportError, "not found on the server"),
    ((jse.APIError,), TransportError, "JetStream refused the request"),
    ((ne.NoServersError,), TransportError, "no NATS server could be reached"),
    ((ne.ConnectionClosedError,), TransportError, "the connection is closed"),
    (
        (ne.OutboundBufferLimitError,),
        TransportError,
        "the outgoing buffer is full while reconnecting",
    ),
    ((ne.MaxPayloadError,), TransportError, "the message exceeds the server's max_payload"),
    ((ne.StaleConnectionError,), TransportError, "the connection went stale"),
    ((ne.TimeoutError, asyncio.TimeoutError), TransportError, "the server did not answer in time"),
    ((ne.Error,), TransportError, "the NATS client failed"),
    ((OSError,), TransportError, "network error"),
]

TRANSIENT_API_CODES = frozenset({10004, 10005, 10007, 10008, 10009, 10041})
"""JetStream error codes of a cluster that is electing or moving: incomplete results, no peers
for placement (a node is down), not assigned to this server, temporarily unavailable, not the
leader, a raft error. Each passes once the cluster settles; any 503 does too."""
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ne.TimeoutError,
    asyncio.TimeoutError,
    ne.NoRespondersError,
    jse.ServiceUnavailableError,
    jse.NoStreamResponseError,
    ne.ConnectionReconnectingError,
    ne.StaleConnectionError,
)


def is_transient(exc: BaseException) -> bool:
    """Does ``exc`` (a nats-py error, or a choreograph error caused by one) come from a server or
    cluster that is busy, restarting or electing a leader, so that the same request can succeed
    a little later?"""
    while isinstance(exc, ChoreographError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, jse.APIError) and not isinstance(exc, jse.ServiceUnavailableError):
        return exc.code == 503 or exc.err_code in TRANSIENT_API_CODES
    return isinstance(exc, _TRANSIENT_ERRORS)


TRANSLATED: tuple[type[BaseException], ...] = tuple(
    kind for kinds, _, _ in ERROR_TABLE for kind in kinds
)


def translate(exc: BaseException, doing: str) -> ChoreographError:
    """The choreograph exception for a nats-py (or network) exception raised while ``doing``."""
    if isinstance(exc, ChoreographError):
        return exc
    for kinds, target, meaning in ERROR_TABLE:
        if isinstance(exc, kinds):
            detail = str(exc) or type(exc).__name__
            return target(f"NATS: {doing}: {meaning} ({type(exc).__name__}: {detail})")
    return TransportError(f"NATS: {doing}: {type(exc).__name__}: {exc}")


@contextmanager
def translated(doing: str) -> Iterator[None]:
    """Re-raise nats-py and network errors as choreograph errors (chained to the original)."""
    try:
        yield
    except TRANSLATED as exc:
        raise translate(exc, doing) from exc
