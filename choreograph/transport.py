"""The bus contract every transport honours, and the choice of a transport by URL.

Vocabulary
    A **message** is one encoded event (an opaque ``body``) published under a **topic** (the event
    type). A **group** is a named consumer group, one per service: every group receives every
    message of the topics it declared, and the **members** of one group (replicas, worker tasks)
    compete for them.

Guarantees (checked by ``tests/conformance`` on every transport)
    * **Durable publish.** When :meth:`Transport.publish` returns, every message is stored by the
      bus and will reach every group that had declared its topic when it was published, even
      groups with no member running at that moment. Groups declared later do not see older messages.
    * **At-least-once.** A delivered message stays leased to its member until that member
      :meth:`~Subscription.ack`\\ s, :meth:`~Subscription.retry`\\ s or
      :meth:`~Subscription.dead_letter`\\ s it. If the member dies or its lease (``lease`` seconds)
      runs out, the message is delivered again to some member of the group, with ``attempt`` + 1.
    * **Durable delayed retry.** :meth:`Subscription.retry` redelivers to the same group, never
      before ``delay`` seconds have passed, and survives a restart of every process and the bus.
    * **Dead letters** keep the message, the group, the reason, the error, its traceback and the
      attempts. They can be listed, fetched one by one, and replayed to their group only.
    * **No head-of-line blocking.** A message being retried or dead-lettered never stops the others.
    * **Ordering.** None is promised between the members of a group, nor after a retry. What one
      member receives, redeliveries aside, is in publish order as :attr:`Transport.member_order`
      claims (checked by the suite); each transport documents the rest in
      ``docs/transports.md``, and ``docs/ordering.md`` what the runtime builds on it.
    * **Size.** ``max_message_bytes`` is the largest body the transport carries, the broker's own
      limit included (less what the transport adds: headers, dead-letter fields, replay routing),
      so a message that fits is also dead-lettered and replayed intact. A message over it is never
      sent and never fails its batch: :meth:`Transport.publish` dead-letters it *by reference*
      (:func:`oversized`) for the groups it was meant for, and the rest of the batch goes out.
"""

from __future__ import annotations

import hashlib
import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Self, TypeVar
from urllib.parse import SplitResult, parse_qsl, unquote_plus, urlsplit

import orjson

from choreograph.envelope import MAX_EVENT_BYTES
from choreograph.errors import ConfigurationError, PayloadTooLarge

_GROUP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def check_group(name: str) -> str:
    """Return ``name`` if it is a valid group name (letters, digits, '_' and '-'), else raise."""
    if not name or len(name) > 100 or not set(name) <= _GROUP_CHARS:
        raise ConfigurationError(
            f"invalid group/service name {name!r}: use 1-100 letters, digits, '_' or '-'"
        )
    return name


@dataclass(frozen=True, slots=True)
class Message:
    """What is published: one encoded event."""

    id: str
    """The event id. Two messages with the same id are the same event (consumers dedupe on it)."""
    topic: str
    """The event type; groups subscribe to topics."""
    body: bytes
    """The encoded event, opaque to the transport."""
    group: str | None = None
    """When set, the message goes to this group only (used by replay); otherwise to every group
    that declared ``topic``."""


@dataclass(slots=True)
class Delivery:
    """A message handed to one member of a group, leased to it until settled."""

    message: Message
    attempt: int
    """1 on the first delivery to this group; +1 on every redelivery (retry, expired lease)."""
    handle: Any = field(default=None, repr=False)
    """Transport-private bookkeeping (stream sequence, delivery tag, row id...)."""


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a message is dead-lettered."""

    reason: str
    """Short category, e.g. ``schema violation`` or ``attempts exhausted``."""
    error_type: str
    """The exception class name."""
    error: str
    """The exception's message."""
    traceback: str = field(default="", compare=False)
    """Where it was raised: the formatted traceback, its end kept when long (bounded by
    :data:`choreograph.logs.MAX_TRACEBACK_CHARS`); empty for messages that could not be read.
    Logged with the failure, stored with the dead letter, reported to the flow recorder."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-lettered message and why it died."""

    id: str
    """Transport-assigned id of this dead-letter record (used by replay)."""
    group: str
    message: Message
    failure: Failure
    attempts: int
    failed_at: float
    """Epoch seconds."""


OVERSIZED_HEAD_BYTES = 1024
"""At most this much of an oversized body is kept in its dead letter."""
_REFERENCE_BYTES = 4096
"""The largest reference body (JSON escapes can make a head of 1 KiB grow sixfold)."""


def oversized(message: Message, limit: int) -> tuple[Message, Failure]:
    """The dead letter standing for ``message``, whose body is over ``limit``: the same id, topic
    and target group, and as body a small JSON reference (``{"oversized": true, "bytes",
    "limit", "sha256", "head"}``, ``head`` being the body's first bytes read as UTF-8, at most
    :data:`OVERSIZED_HEAD_BYTES` and fewer when their JSON would not fit in 4 KiB or in
    ``limit``), so the dead letter fits where the message did not. Replay it with a corrected
    ``body``; replayed as it is, the reference reaches the group and is refused there.
    """
    body = message.body
    digest = hashlib.sha256(body).hexdigest()
    keep = OVERSIZED_HEAD_BYTES
    while True:
        head = body[:keep].decode("utf-8", errors="replace")
        reference = orjson.dumps({"oversized": True, "bytes": len(body), "limit": limit,
                                  "sha256": digest, "head": head})  # fmt: skip
        if keep == 0 or len(reference) <= min(limit, _REFERENCE_BYTES):
            break
        keep //= 2
    failure = Failure(
        PayloadTooLarge.reason,
        PayloadTooLarge.__name__,
        f"message of {len(body)} bytes is over the transport's limit of {limit}: not sent; "
        f"the dead letter keeps its first {keep} bytes and its sha256 {digest}",
    )
    return Message(message.id, message.topic, reference, message.group), failure


def split_oversized(messages: Sequence[Message], limit: int) -> tuple[list[Message], list[Message]]:
    """The messages whose body fits in ``limit``, and those over it, each in their order."""
    fits = [m for m in messages if len(m.body) <= limit]
    if len(fits) == len(messages):
        return fits, []
    return fits, [m for m in messages if len(m.body) > limit]


class Subscription(ABC):
    """One member of a consumer group, receiving the group's messages."""

    group: str
    topics: frozenset[str]

    @abstractmethod
    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` seconds for messages; return between 0 and ``max_messages``.

        Each delivery is leased to this member until it is settled or its lease runs out.
        """

    @abstractmethod
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Settle as done: the messages are never delivered to this group again.

        A settlement (ack, retry, dead-letter) arriving after the lease ran out and another
        member took the message may be ignored: the message is then handled again, which the
        runtime's inbox makes harmless.
        """

    @abstractmethod
    async def retry(self, delivery: Delivery, delay: float) -> None:
        """Deliver again to this group, not before ``delay`` seconds, with ``attempt`` + 1.

        Durable: a pending retry survives a restart of every process and of the bus.
        """

    @abstractmethod
    async def dead_letter(self, delivery: Delivery, failure: Failure) -> None:
        """Move the message to the group's dead letters. It is stored there before it leaves the
        live queue, so a crash in between can duplicate it but never lose it."""

    @abstractmethod
    async def close(self) -> None:
        """Stop receiving. Unsettled deliveries go back to the group (at once where the bus
        allows it, else when their lease runs out); whether the give-back counts as an attempt
        depends on the transport (``docs/transports.md``). Idempotent."""


class Transport(ABC):
    """A message bus. Create one with :func:`transport_from_url`."""

    scheme: ClassVar[str]
    member_order: ClassVar[Literal["group", "topic", "none"]] = "none"
    """The order in which one member receives its group's messages, first deliveries of
    messages published one after the other: ``group``, publish order across all its topics;
    ``topic``, publish order within each topic; ``none``, no order. Ordering per key
    (``docs/ordering.md``) holds across event types only on a ``group`` transport."""
    gives_back_in_order: ClassVar[bool] = False
    """Whether what a member gives back when it closes reaches the group's next member before
    the messages behind it, in their order (ordering per key then survives a graceful restart).
    After a crash it depends on whether the bus notices the death at once (RabbitMQ: the
    connection drops, the messages go back in their place) or only when the lease runs out (the
    others: the messages behind come first)."""
    max_message_bytes: int = MAX_EVENT_BYTES
    """The largest body published, dead-lettered and replayed intact (see *Size* above). Broker
    transports lower it on :meth:`connect` to what their server accepts."""

    @abstractmethod
    async def connect(self) -> None:
        """Open connections and create what the bus needs. Idempotent."""

    @abstractmethod
    async def close(self) -> None:
        """Close connections. Subscriptions opened through this transport are closed first."""

    @abstractmethod
    async def declare_group(self, group: str, topics: Collection[str]) -> None:
        """Make ``group`` receive ``topics`` from now on, whether or not a member is running.

        Additive and idempotent: topics declared earlier stay declared.
        """

    @abstractmethod
    async def publish(self, messages: Sequence[Message]) -> None:
        """Store the messages durably; when this returns, none of them can be lost.

        A message whose body is over :attr:`max_message_bytes` is not sent: each group it was
        meant for gets it as a dead letter by reference (:func:`oversized`), and the others of
        the batch are published as usual."""

    @abstractmethod
    async def subscribe(
        self, group: str, topics: Collection[str], *, lease: float = 30.0
    ) -> Subscription:
        """Join ``group`` as a new member (declaring the topics first)."""

    @abstractmethod
    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, oldest first, of one group or of all."""

    @abstractmethod
    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """The dead letter with this id, fetched alone (never by listing them all), or None."""

    @abstractmethod
    async def replay(self, dead_letter_id: str, body: bytes | None = None) -> bool:
        """Send a dead letter back to its group only, as a first attempt, and remove it from the
        dead letters. ``body`` replaces the message's body (to replay a corrected event); a
        ``body`` over :attr:`max_message_bytes` raises :class:`PayloadTooLarge` and the dead
        letter stays. Returns False when no such dead letter exists."""

    @abstractmethod
    async def discard(self, dead_letter_id: str) -> bool:
        """Delete a dead letter for good. Returns False when no such dead letter exists."""

    async def delete_namespace(self) -> None:  # noqa: B027 - optional, empty by default
        """Delete everything this transport's namespace holds on the bus, messages included
        (for tests, demos and decommissioning). Transports that keep nothing outside the process
        or a local file do nothing."""

    def orders_across_members(self, group: str) -> bool:
        """Whether ``group``'s messages go to one member at a time, in publish order, and a member
        taking over (also from one that crashed) receives what its predecessor held first, in
        order: ordering per key then holds across replicas (``docs/ordering.md``). Checked by the
        tests of each transport that claims it."""
        return False

    async def lag(self, group: str) -> int | None:
        """Messages waiting for ``group`` (not yet delivered or due), or None when unknown."""
        return None

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


# Settings ---------------------------------------------------------------------------------------

S = TypeVar("S", bound="TransportSettings")


@dataclass(frozen=True)
class TransportSettings:
    """Base of each transport's typed settings, read from the URL's query string.

    ``namespace`` prefixes every stream, queue, key or table the transport creates, so that
    several systems (or tests) can share one broker without seeing each other's messages.
    Its ``repr`` leaves out the URL (which may hold credentials).
    """

    url: str = field(repr=False)
    namespace: str = "choreograph"

    @classmethod
    def from_url(cls, url: str) -> Self:
        parts = urlsplit(url)
        values: dict[str, Any] = {"url": url}
        known = {f.name: f for f in fields(cls)}
        for key, raw in parse_qsl(parts.query, keep_blank_values=True):
            if key not in known or key == "url":
                allowed = ", ".join(sorted(k for k in known if k != "url"))
                raise ConfigurationError(
                    f"unknown option {key!r} in transport URL {redact(url)}; known: {allowed}"
                )
            values[key] = _coerce(key, raw, known[key].type)
        settings = cls(**values)
        check_group(settings.namespace)
        return settings

    def server_url(self, *schemes: str) -> SplitResult:
        """The URL's parts, once its scheme is one of ``schemes`` and its port is a number."""
        parts = urlsplit(self.url)
        if parts.scheme not in schemes:
            allowed = " or ".join(f"{s}://" for s in schemes)
            raise ConfigurationError(f"{redact(self.url)}: the scheme must be {allowed}")
        try:
            parts.port  # noqa: B018 - parsing it validates it
        except ValueError:
            raise ConfigurationError(
                f"{redact(self.url)}: the port must be a number 1-65535"
            ) from None
        return parts


def _coerce(key: str, raw: str, annotation: Any) -> Any:
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "str")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise ConfigurationError(f"option {key!r} expects {kind}, got {raw!r}") from None
    return raw


#: A URL inside a text: a scheme, ``://``, then everything up to white space.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s<>]*")
_NEXT_URL = re.compile(r",(?=[A-Za-z][A-Za-z0-9+.-]*://)")
#: Option names whose value is a secret, wherever they appear in a query string.
_SECRET_OPTIONS = frozenset(
    {"password", "passwd", "pass", "pwd", "sslpassword", "token", "auth_token", "access_token",
     "secret", "client_secret", "api_key", "apikey", "nkeys_seed", "seed"}
)  # fmt: skip


def redact(text: str) -> str:
    """``text`` (a URL, or a message with URLs in it) with every secret of its URLs replaced by
    ``***``, for messages, logs and errors. The one place the framework hides credentials:

    * a password: ``amqp://user:***@host``;
    * a user name given alone, which several brokers read as a token: ``nats://***@host``;
    * options named like a secret (``password=``, ``token=``, ...): ``?token=***``;
    * URLs inside option values, redacted the same way: ``?servers=nats://u:***@h2,...``.

    Host, port, path and the other options stay, so the message still says where. Never raises.
    """
    return _URL_IN_TEXT.sub(lambda match: _redact_urls(match.group(0)), text)


def _redact_urls(found: str) -> str:
    """One URL, or several joined by commas (a server list)."""
    return ",".join(_redact_url(url) for url in _NEXT_URL.split(found))


def _redact_url(url: str) -> str:
    scheme, _, rest = url.partition("://")
    # The authority ends where the path or the query starts. A '#' does not end it here: in a
    # password it is a typo the driver rejects, and the error message must not show the rest.
    cut = min((i for i in (rest.find(c) for c in "/?") if i >= 0), default=len(rest))
    authority, rest = rest[:cut], rest[cut:]
    userinfo, at, host = authority.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        authority = f"{user}:***@{host}" if colon else f"***@{host}"
    path, question, query = rest.partition("?")
    if question:
        query, hash_, fragment = query.partition("#")
        query = "&".join(_redact_option(option) for option in query.split("&")) + hash_ + fragment
    return f"{scheme}://{authority}{path}{question}{query}"


def _redact_option(option: str) -> str:
    key, equals, value = option.partition("=")
    if not equals:
        return option
    if unquote_plus(key).lower() in _SECRET_OPTIONS:
        return f"{key}=***"
    decoded = unquote_plus(value)
    if "://" in decoded:  # e.g. servers=nats://user:password@h2,nats://user:password@h3
        redacted = redact(decoded)
        if redacted != decoded:
            return f"{key}={redacted}"
    return option


# Choosing a transport by URL ---------------------------------------------------------------------

_SCHEMES: dict[str, tuple[str, str, str | None]] = {
    # scheme: (module, class, extra to install)
    "memory": ("choreograph.transports.memory", "MemoryTransport", None),
    "sqlite": ("choreograph.transports.sqlite", "SqliteTransport", None),
    "nats": ("choreograph.transports.nats", "NatsTransport", "nats"),
    "amqp": ("choreograph.transports.rabbitmq", "RabbitMQTransport", "rabbitmq"),
    "redis": ("choreograph.transports.redis", "RedisTransport", "redis"),
    "rediss": ("choreograph.transports.redis", "RedisTransport", "redis"),
    "amqps": ("choreograph.transports.rabbitmq", "RabbitMQTransport", "rabbitmq"),
}

DEFAULT_TRANSPORT_URL = "sqlite:///choreograph.db"


def load_backend(module_name: str, class_name: str, extra: str | None, what: str) -> Any:
    """Import an optional backend lazily; a missing driver names the extra to install."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if extra is None or (exc.name or "").startswith("choreograph"):
            raise
        raise ConfigurationError(
            f"the {what} needs an extra: pip install 'choreograph[{extra}]' ({exc})"
        ) from None
    return getattr(module, class_name)


def transport_from_url(url: str | None = None) -> Transport:
    """Create (not yet connected) the transport a URL names.

    ``memory://``, ``sqlite:///relative.db`` or ``sqlite:////abs/path.db``, ``nats://host:4222``,
    ``amqp://user:pass@host:5672/vhost``, ``redis://host:6379/0``; options go in the query string.
    """
    url = url or DEFAULT_TRANSPORT_URL
    scheme = urlsplit(url).scheme
    if scheme not in _SCHEMES:
        raise ConfigurationError(
            f"unknown transport {redact(url)!r}; use one of: "
            + ", ".join(f"{s}://" for s in _SCHEMES)
        )
    module_name, class_name, extra = _SCHEMES[scheme]
    cls: type[Transport] = load_backend(module_name, class_name, extra, f"{scheme}:// transport")
    return cls.from_url(url)  # type: ignore[attr-defined, no-any-return]
