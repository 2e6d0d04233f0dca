"""The options of a ``redis://`` URL, checked when they are parsed."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from choreograph.errors import ConfigurationError
from choreograph.transport import TransportSettings, check_group, redact


@dataclass(frozen=True)
class RedisSettings(TransportSettings):
    """Options of ``redis://host:port/db?option=value&...`` (``rediss://`` for TLS).

    Credentials go in the URL's user info or, better, in the environment variable that
    ``password_env`` names, so they never appear in code or configuration files.
    """

    tls: bool = False
    """Use TLS (the same as a ``rediss://`` URL)."""
    tls_ca_file: str = ""
    """CA bundle to verify the server with (default: the system's)."""
    tls_cert_file: str = ""
    """Client certificate, for servers that require one (``tls-auth-clients yes``)."""
    tls_key_file: str = ""
    tls_verify: bool = True
    """Verify the server certificate and host name. Turn off only for tests."""
    password_env: str = ""
    """Name of an environment variable holding the password (overrides the URL's)."""
    connect_timeout: float = 5.0
    """Seconds :meth:`RedisTransport.connect` keeps trying before it gives up."""
    socket_timeout: float = 10.0
    """Seconds one command may take before its connection is considered dead."""
    reconnect_timeout: float = 30.0
    """Seconds an operation keeps retrying while Redis is unreachable, then TransportError."""
    max_connections: int = 64
    """Connections per transport; blocking reads hold one each while they wait."""
    housekeeping_interval: float = 0.5
    """How often a member moves due retries and takes over expired leases (the upper bound on
    how late those happen)."""
    wait_replicas: int = 0
    """With replicas: a publish, retry or dead-letter returns only when this many replicas have
    it (Redis WAIT); fewer within ``wait_timeout`` raises TransportError."""
    wait_timeout: float = 1.0
    partitioned: str = ""
    """Groups (comma-separated) consumed by key partition: each message goes to one of the
    group's ``partitions`` streams by its key (the event's ``partitionkey``, else its
    correlation id), each partition is read by one member at a time, and the partitions are
    spread over the live members, moving when members come and go (``docs/ordering.md``)."""
    partitions: int = 16
    """Partitions of each ``partitioned`` group: at most this many members work at once. Set
    when the group is first declared; declaring it with another number is refused."""

    @property
    def partitioned_groups(self) -> frozenset[str]:
        return frozenset(g.strip() for g in self.partitioned.split(",") if g.strip())

    def __post_init__(self) -> None:
        parts = self.server_url("redis", "rediss")
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ConfigurationError(f"the database in {redact(self.url)} must be a number")
        positive = {
            "connect_timeout": self.connect_timeout,
            "socket_timeout": self.socket_timeout,
            "reconnect_timeout": self.reconnect_timeout,
            "housekeeping_interval": self.housekeeping_interval,
            "wait_timeout": self.wait_timeout,
            "max_connections": self.max_connections,
        }
        for name, value in positive.items():
            if not value > 0 or math.isinf(value):
                raise ConfigurationError(f"option {name!r} must be a positive number, not {value}")
        for group in self.partitioned_groups:
            check_group(group)
        if not 1 <= self.partitions <= 1024:
            raise ConfigurationError(f"option 'partitions' must be 1-1024, not {self.partitions}")
        if self.wait_replicas < 0:
            raise ConfigurationError("option 'wait_replicas' must not be negative")
        if self.password_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.password_env):
            raise ConfigurationError(
                f"option 'password_env' is not a variable name: {self.password_env!r}"
            )
