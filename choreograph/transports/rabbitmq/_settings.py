"""The options of an ``amqp://`` or ``amqps://`` URL, checked when they are parsed."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

from choreograph.errors import ConfigurationError
from choreograph.transport import TransportSettings, check_group, redact

_MAX_AGE = re.compile(r"^[1-9][0-9]*[YMDhms]$")


@dataclass(frozen=True)
class RabbitMQSettings(TransportSettings):
    """``amqp[s]://user:password@host:port/vhost?namespace=…&prefetch=…`` (vhost ``/`` by default,
    written ``%2F`` when spelled out)."""

    prefetch: int = 500
    """Unacked messages one member may hold (handed out or buffered): basic.qos per consumer."""
    publish_window: int = 1000
    """Messages written before waiting for their publisher confirms, all at once."""
    publish_timeout: float = 30.0
    """How long publish, retry and dead_letter wait, reconnections included, before failing."""
    connect_timeout: float = 10.0
    heartbeat: int = 30
    """AMQP heartbeat (seconds): how soon a silent peer is detected as dead (0 = off)."""
    max_message_size: int = 134_217_728
    """The server's ``max_message_size`` (RabbitMQ's default: 128 MiB). Set it when the server is
    configured lower: the transport's ``max_message_bytes`` is never above it, so an oversized
    message is dead-lettered by reference instead of closing the channel."""
    dlq_max_age: str = ""
    """Stream retention of the dead letters, e.g. ``30D`` (Y, M, D, h, m, s); empty keeps all."""
    single_active: str = ""
    """Groups (comma-separated) whose queue has a single active consumer: one member of the
    group receives at a time, the others stand by and the broker hands the queue to one of them
    when it goes, so the group's messages are handled in order across replicas
    (``docs/ordering.md``). Set when the group's queue is created: an existing queue keeps its
    arguments (changing it is refused; delete the queue first)."""
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""

    @property
    def single_active_groups(self) -> frozenset[str]:
        return frozenset(g.strip() for g in self.single_active.split(",") if g.strip())

    def __post_init__(self) -> None:
        check_group(self.namespace)
        for group in self.single_active_groups:
            check_group(group)
        parts = self.server_url("amqp", "amqps")
        where = redact(self.url)
        if not parts.hostname:
            raise ConfigurationError(f"{where}: the URL needs a host, e.g. amqp://localhost:5672/")
        if "/" in parts.path[1:]:
            raise ConfigurationError(f"{where}: the vhost is one path segment; write '/' as %2F")
        checks = [
            (1 <= self.prefetch <= 65_535, "prefetch must be 1-65535"),
            (1 <= self.publish_window <= 100_000, "publish_window must be 1-100000"),
            (self.publish_timeout > 0, "publish_timeout must be positive seconds"),
            (self.connect_timeout > 0, "connect_timeout must be positive seconds"),
            (0 <= self.heartbeat <= 3600, "heartbeat must be 0-3600 seconds"),
            (
                1 <= self.max_message_size <= 536_870_912,
                "max_message_size must be 1-536870912 bytes (RabbitMQ's largest)",
            ),
            (
                not self.dlq_max_age or bool(_MAX_AGE.match(self.dlq_max_age)),
                "dlq_max_age: e.g. 30D",
            ),
            (not self.keyfile or bool(self.certfile), "keyfile needs certfile"),
            (
                parts.scheme == "amqps" or not (self.cafile or self.certfile),
                "cafile/certfile need amqps://",
            ),
        ]
        for ok, problem in checks:
            if not ok:
                raise ConfigurationError(f"{where}: {problem}")

    @property
    def vhost(self) -> str:
        path = urlsplit(self.url).path
        return unquote(path[1:]) if len(path) > 1 else "/"

    def client_url(self) -> str:
        """The URL handed to the AMQP client: ours without our options, plus the heartbeat."""
        parts = urlsplit(self.url)
        return urlunsplit(
            (parts.scheme, parts.netloc, parts.path or "/", f"heartbeat={self.heartbeat}", "")
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if urlsplit(self.url).scheme != "amqps":
            return None
        context = ssl.create_default_context(cafile=self.cafile or None)
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile or None)
        return context
