"""The typed settings of ``nats://`` URLs, and the nats-py connection options they make."""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from choreograph.errors import ConfigurationError
from choreograph.transport import TransportSettings, check_group

_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")


@dataclass(frozen=True)
class NatsSettings(TransportSettings):
    """Options of ``nats://[user:password@]host:port?option=value&...`` (``tls://`` for TLS).

    Credentials are best kept out of the URL: name an environment variable with
    ``password_env``/``token_env``, or give a ``.creds`` file (NGS / operator mode).
    """

    servers: str = field(default="", repr=False)  # may hold credentials
    """More servers of the cluster, comma separated (``nats://h2:4222,nats://h3:4222``)."""
    name: str = ""
    """Connection name shown in the server's monitoring (default: ``choreograph-<namespace>``)."""
    storage: str = "file"
    """``file`` (durable) or ``memory`` (lost when the server stops: tests only)."""
    replicas: int = 1
    """Replicas of both streams and of the consumers (1, or 3 in a 3-node cluster)."""
    retention: str = "interest"
    """``interest``: a message stays until every group that declared its topic settled it.
    ``limits``: messages stay until ``max_age``/``max_bytes`` (ack does not delete)."""
    max_age: float = 0.0
    """Seconds a message may stay in the events stream at most (0: no limit)."""
    max_bytes: int = -1
    """Bytes the events stream may hold (-1: no limit); when full, publishes fail."""
    dlq_max_age: float = 0.0
    """Seconds a dead letter is kept (0: until replayed or discarded)."""
    ack_wait: float = 30.0
    """The lease of groups declared by :meth:`declare_group` (``subscribe(lease=...)`` sets it
    for its group)."""
    max_deliver: int = -1
    """Deliveries of a message to a group before JetStream gives up on it; -1: never (the runtime
    dead-letters by its own attempt count; a limit would drop messages silently)."""
    max_ack_pending: int = -1
    """Delivered-but-unsettled messages per consumer (delayed retries count); -1: no limit, so
    pending retries can never stall a group."""
    duplicate_window: float = 120.0
    """Seconds the server remembers event ids to drop duplicate publishes (a publish resent after
    a lost confirmation)."""
    publish_timeout: float = 30.0
    """Seconds a publish keeps trying (across reconnects) before it raises TransportError."""
    confirm_timeout: float = 5.0
    """Seconds one publish attempt waits for the server's confirmations before resending."""
    request_timeout: float = 5.0
    """Seconds one JetStream API request (declare, lag, dead letters) may take."""
    api_retry_timeout: float = 120.0
    """Seconds a JetStream API request keeps being retried, with backoff, while the server or the
    cluster cannot answer it (timeouts, no responders, no leader, a node down) before it raises
    TransportError: start-up waits out a cluster that is electing or missing a node."""
    connect_timeout: float = 5.0
    reconnect_wait: float = 0.5
    """Seconds between reconnection attempts (the client reconnects for ever)."""
    retry_margin: float = 1.0
    """Seconds added to a delayed retry, at most the delay itself (``min(retry_margin, delay)``).
    The server keeps the due time of a pending retry to the whole second across its own restart,
    so without a margin a retry pending while the server restarts may come up to 1 s early. 0
    gives exact delays while the server runs."""
    ack_flush: bool = True
    """ack/retry/dead-letter return once the server has processed the settlement (one round
    trip per call, not per message). Off: they return once the settlement is queued."""
    password_env: str = ""
    """Environment variable holding the password (overrides the URL's)."""
    token_env: str = ""
    """Environment variable holding an authentication token."""
    creds: str = ""
    """Path of a ``.creds`` file (JWT + NKey seed)."""
    tls: bool = False
    """Use TLS (the same as a ``tls://`` URL)."""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    """Client certificate, for servers that verify clients."""
    tls_key_file: str = ""
    tls_verify: bool = True
    """Verify the server certificate and host name. Turn off only for tests."""
    partitioned: str = ""
    """Groups (comma-separated) consumed by key partition: the group's messages are moved into
    ``partitions`` partitions by the hash of their key (the event's ``partitionkey``, else its
    correlation id), each partition is pulled by one member at a time, and the partitions are
    spread over the live members, moving when members come and go (``docs/ordering.md``).
    Publishers need no option."""
    partitions: int = 16
    """Partitions of each ``partitioned`` group: at most this many members work at once. Set
    when the group is first declared partitioned; declaring it otherwise is refused."""

    @property
    def partitioned_groups(self) -> frozenset[str]:
        return frozenset(g.strip() for g in self.partitioned.split(",") if g.strip())

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.namespace):
            raise ConfigurationError(
                f"namespace {self.namespace!r}: use 1-100 letters, digits, '_' or '-' "
                "(it prefixes stream names and subjects)"
            )
        self.server_url("nats", "tls")
        if self.storage not in ("file", "memory"):
            raise ConfigurationError(f"storage must be 'file' or 'memory', got {self.storage!r}")
        if self.retention not in ("interest", "limits"):
            raise ConfigurationError(
                f"retention must be 'interest' or 'limits', got {self.retention!r}"
            )
        if not 1 <= self.replicas <= 5:
            raise ConfigurationError(f"replicas must be 1 to 5, got {self.replicas}")
        positive = {
            "ack_wait": self.ack_wait,
            "publish_timeout": self.publish_timeout,
            "confirm_timeout": self.confirm_timeout,
            "request_timeout": self.request_timeout,
            "api_retry_timeout": self.api_retry_timeout,
            "connect_timeout": self.connect_timeout,
            "reconnect_wait": self.reconnect_wait,
        }
        for key, value in positive.items():
            if not value > 0:
                raise ConfigurationError(f"{key} must be > 0 seconds, got {value}")
        not_negative = {
            "max_age": self.max_age,
            "dlq_max_age": self.dlq_max_age,
            "duplicate_window": self.duplicate_window,
            "retry_margin": self.retry_margin,
        }
        for key, value in not_negative.items():
            if not value >= 0:
                raise ConfigurationError(f"{key} must be >= 0 seconds, got {value}")
        if self.max_deliver == 0 or self.max_deliver < -1:
            raise ConfigurationError(f"max_deliver must be -1 or >= 1, got {self.max_deliver}")
        if self.max_ack_pending == 0 or self.max_ack_pending < -1:
            raise ConfigurationError(
                f"max_ack_pending must be -1 or >= 1, got {self.max_ack_pending}"
            )
        if self.max_bytes == 0 or self.max_bytes < -1:
            raise ConfigurationError(f"max_bytes must be -1 or >= 1, got {self.max_bytes}")
        if self.retention == "limits" and self.max_age == 0 and self.max_bytes == -1:
            raise ConfigurationError(
                "retention=limits keeps every message for ever: set max_age (seconds) or max_bytes"
            )
        for key in ("password_env", "token_env"):
            variable = getattr(self, key)
            if variable and variable not in os.environ:
                raise ConfigurationError(f"{key}: environment variable {variable} is not set")
        for key in ("creds", "tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, key)
            if path and not os.path.isfile(path):
                raise ConfigurationError(f"{key}: no such file {path!r}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigurationError("tls_cert_file and tls_key_file go together")
        for group in self.partitioned_groups:
            check_group(group)
        if not 1 <= self.partitions <= 256:
            raise ConfigurationError(f"partitions must be 1 to 256, got {self.partitions}")

    @property
    def use_tls(self) -> bool:
        return self.tls or urlsplit(self.url).scheme == "tls" or bool(self.tls_ca_file)

    def server_urls(self) -> list[str]:
        """The servers to connect to, without query strings (credentials stay in the first)."""
        parts = urlsplit(self.url)
        first = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        extra = [s.strip() for s in self.servers.split(",") if s.strip()]
        return [first, *extra]

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` (callbacks excluded)."""
        parts = urlsplit(self.url)
        options: dict[str, Any] = {
            "servers": self.server_urls(),
            "name": self.name or f"choreograph-{self.namespace}",
            "connect_timeout": self.connect_timeout,
            "reconnect_time_wait": self.reconnect_wait,
            # a few attempts to connect at first (connect() fails fast); once connected, the
            # client reconnects for ever (Client.open sets it)
            "max_reconnect_attempts": 2,
            "allow_reconnect": True,
            # what may queue while reconnecting; publishes wait for the reconnection instead
            "pending_size": 8 * 1024 * 1024,
        }
        if self.password_env:
            options["user"] = unquote(parts.username or "")
            options["password"] = os.environ[self.password_env]
        if self.token_env:
            options["token"] = os.environ[self.token_env]
        if self.creds:
            options["user_credentials"] = self.creds
        if self.use_tls:
            options["tls"] = self.ssl_context()
            if parts.hostname:
                options["tls_hostname"] = parts.hostname
        return options

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.tls_ca_file or None)
        if self.tls_cert_file:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        if not self.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context
