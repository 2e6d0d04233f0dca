"""``amqp://`` and ``amqps://`` — RabbitMQ (AMQP 0-9-1) 3.10+, no plugin needed.

On the broker, ``ns`` being the namespace: a topic exchange ``ns.events`` (routing key = topic), a
topic exchange ``ns.groups`` (messages for one group: replays, retries, give-backs), one quorum
queue ``ns.g.<group>`` per group, the retry ladder ``ns.delay.<k>`` (k = 0..31: a quorum queue
holding messages 2**k ms, then dead-lettering them, at least once, to rung k-1; a delay of d ms
visits the rungs of the 1-bits of d), and a stream ``ns.dlq`` of dead letters and tombstones.
Guarantees, ordering, limits and settings: ``docs/transport-rabbitmq.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import ssl
import struct
import time
import uuid
from collections import deque
from collections.abc import Collection, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Self, cast
from urllib.parse import unquote, urlsplit, urlunsplit

import aiormq
import aiormq.exceptions as amqp_errors
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

from choreograph.errors import ChoreographError, ConfigurationError, PayloadTooLarge, TransportError
from choreograph.transport import (
    DeadLetter,
    Delivery,
    Failure,
    Message,
    Subscription,
    Transport,
    TransportSettings,
    check_group,
    redact,
)

log = logging.getLogger("choreograph.transports.rabbitmq")

ATTEMPT = "x-choreograph-attempt"
"""Header set on every copy this transport re-publishes (retry, give-back): its attempt number.
The quorum queue adds ``x-delivery-count`` (returns since it was enqueued) on top of it."""
_KIND, _DL_ID, _GROUP = "x-choreograph-kind", "x-choreograph-dead-letter", "x-choreograph-group"
_REASON, _ERROR_TYPE, _ERROR = (
    "x-choreograph-reason",
    "x-choreograph-error-type",
    "x-choreograph-error",
)
_ATTEMPTS, _FAILED_AT = "x-choreograph-attempts", "x-choreograph-failed-at-ms"
_DLQ_KEY = "~dlq"  # routes to the dead-letter stream through ns.groups: no group name has a '~'
_WINDOW_BYTES = 4 << 20  # a publish window also stops at this many bytes of bodies
_MAX_ERROR_BYTES = 16_384  # failure text travels in a header frame, which must fit in frame_max
DELAY_LEVELS = 32
"""Rungs of the retry ladder: the longest retry delay is 2**32 - 1 ms (about 49.7 days)."""
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
    dlq_max_age: str = ""
    """Stream retention of the dead letters, e.g. ``30D`` (Y, M, D, h, m, s); empty keeps all."""
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""

    def __post_init__(self) -> None:
        check_group(self.namespace)
        parts = urlsplit(self.url)
        where = redact(self.url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ConfigurationError(f"{where}: the scheme must be amqp:// or amqps://")
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ConfigurationError(f"{where}: the port must be a number 1-65535") from None
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


# Errors -----------------------------------------------------------------------------------------

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


# Frames -----------------------------------------------------------------------------------------
# publish() writes whole windows of messages as one buffer and registers their confirmations
# itself: the client's one-call-per-message path costs ~100 µs of CPU per message.

_FRAME_END = b"\xce"
_PUBLISH = struct.pack(">HHH", 60, 40, 0)  # basic.publish, reserved-1
_FLAGS = (1 << 12) | (1 << 7) | (1 << 5)  # property flags: delivery-mode, message-id, type
_HEADERS_FLAG = 1 << 13
_ATTEMPT_KEY = bytes((len(ATTEMPT),)) + ATTEMPT.encode() + b"I"


def _shortstr(value: str, what: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ConfigurationError(f"{what} {value[:40]!r}… is over 255 bytes, the AMQP limit")
    return bytes((len(raw),)) + raw


def _header(message_id: str, topic: str, size: int, attempt: int = 1) -> bytes:
    """Content-header payload: persistent, message-id, type (and the attempt header if > 1)."""
    ids = b"\x02" + _shortstr(message_id, "event id") + _shortstr(topic, "topic")
    if attempt == 1:
        return struct.pack(">HHQH", 60, 0, size, _FLAGS) + ids
    table = _ATTEMPT_KEY + struct.pack(">i", attempt)
    return struct.pack(">HHQHI", 60, 0, size, _FLAGS | _HEADERS_FLAG, len(table)) + table + ids


def _rich_header(properties: spec.Basic.Properties, size: int) -> bytes:
    return ContentHeader(0, size, properties).marshal()


@dataclass(slots=True)
class _Out:
    """One message ready to go: where to, and its marshalled content header."""

    exchange: str
    routing_key: str
    header: bytes
    body: bytes
    message_id: str

    def frames(self, channel: int, max_body: int, mandatory: bool) -> bytes:
        method = (
            _PUBLISH
            + _shortstr(self.exchange, "exchange")
            + _shortstr(self.routing_key, "routing key")
            + (b"\x01" if mandatory else b"\x00")
        )
        parts = [
            struct.pack(">BHI", 1, channel, len(method)), method, _FRAME_END,
            struct.pack(">BHI", 2, channel, len(self.header)), self.header, _FRAME_END,
        ]  # fmt: skip
        body = self.body
        for start in range(0, len(body), max_body):
            chunk = body[start : start + max_body]
            parts += (struct.pack(">BHI", 3, channel, len(chunk)), chunk, _FRAME_END)
        return b"".join(parts)


def _int(value: object, default: int) -> int:
    return value if type(value) is int else default


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


# The transport ----------------------------------------------------------------------------------


class RabbitMQTransport(Transport):
    scheme = "amqp"

    def __init__(self, settings: RabbitMQSettings) -> None:
        self.settings = settings
        ns = settings.namespace
        self._events, self._groups_ex, self._dlq = f"{ns}.events", f"{ns}.groups", f"{ns}.dlq"
        self._conn: aiormq.Connection | None = None
        self._pub: aiormq.Channel | None = None
        self._ctl: aiormq.Channel | None = None
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._connect_lock = asyncio.Lock()
        self._channel_lock = asyncio.Lock()
        self._delay_lock = asyncio.Lock()
        self._supervisor: asyncio.Task[None] | None = None
        self._subscriptions: set[RabbitMQSubscription] = set()
        self._declared: dict[str, set[str]] = {}
        self._delay_top = -1
        self._dlq_declared = False
        self._closed = True

    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(RabbitMQSettings.from_url(url))

    def queue(self, group: str) -> str:
        return f"{self.settings.namespace}.g.{group}"

    def _delay(self, level: int) -> str:
        return f"{self.settings.namespace}.delay.{level}"

    # connection ---------------------------------------------------------------------------------

    async def connect(self) -> None:
        async with self._connect_lock:
            if not self._closed:
                return
            where = redact(self.settings.url)
            try:
                async with asyncio.timeout(self.settings.connect_timeout):
                    await self._open()
            except Exception as exc:
                raise translate(exc, f"connecting to {where}") from exc
            self._closed = False
            self._supervisor = asyncio.create_task(self._supervise(), name=f"amqp {where}")

    async def _open(self) -> None:
        conn = aiormq.Connection(
            self.settings.client_url(),
            context=self.settings.ssl_context(),
            client_properties={"connection_name": f"choreograph {self.settings.namespace}"},
        )
        await conn.connect()
        try:
            self._pub = cast(aiormq.Channel, await conn.channel(frame_buffer_size=0))
            self._ctl = cast(aiormq.Channel, await conn.channel(publisher_confirms=False))
            await self._declare_base(self._ctl)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._declared.clear()
        self._delay_top = -1
        self._dlq_declared = False
        self._lost.clear()
        conn.closing.add_done_callback(lambda f: self._on_connection_closed(conn, f))
        self._ready.set()

    def _on_connection_closed(self, conn: aiormq.Connection, closing: asyncio.Future[Any]) -> None:
        if not closing.cancelled():
            closing.exception()
        if conn is self._conn:
            self._ready.clear()
            self._lost.set()

    async def _declare_base(self, ch: aiormq.Channel) -> None:
        for exchange in (self._events, self._groups_ex):
            await ch.exchange_declare(exchange, exchange_type="topic", durable=True)

    async def _declare_dlq(self) -> None:
        """Create the dead-letter stream on first use (a stream holds files open on the broker:
        namespaces that never dead-letter do not pay for one)."""
        if self._dlq_declared:
            return
        arguments: dict[str, Any] = {"x-queue-type": "stream"}
        if self.settings.dlq_max_age:
            arguments["x-max-age"] = self.settings.dlq_max_age
        try:
            ch = await self._channel("ctl", self._deadline())
            await ch.queue_declare(self._dlq, durable=True, arguments=arguments)
            await ch.queue_bind(self._dlq, self._groups_ex, routing_key=_DLQ_KEY)
        except Exception as exc:
            raise translate(exc, f"declaring the dead-letter stream {self._dlq!r}") from exc
        self._dlq_declared = True

    async def _supervise(self) -> None:
        """Reconnect after the connection drops, then let every member consume again."""
        while not self._closed:
            await self._lost.wait()
            if self._closed:
                return
            log.warning("RabbitMQ connection lost; reconnecting to %s", redact(self.settings.url))
            delay = 0.2
            while not self._closed:
                try:
                    async with asyncio.timeout(self.settings.connect_timeout):
                        await self._open()
                    break
                except Exception as exc:  # keep trying until closed
                    log.info("RabbitMQ reconnect failed (%s); next try in %.1fs", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 3.0)
            if not self._closed:
                log.warning("RabbitMQ reconnected")
                for sub in list(self._subscriptions):
                    sub._reconnected()

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            await sub.close()
        self._closed = True
        self._lost.set()
        self._ready.set()  # wakes whoever waits for a reconnection: they see the transport closed
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        self._ready.clear()
        conn, self._conn, self._pub, self._ctl = self._conn, None, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(None, timeout=5)

    async def _connection(self, deadline: float) -> aiormq.Connection:
        """The open connection, waiting for a reconnection until ``deadline`` (loop time)."""
        while True:
            if self._closed:
                raise TransportError("RabbitMQ transport is closed (or not connected yet)")
            conn = self._conn
            if self._ready.is_set() and conn is not None and not conn.is_closed:
                return conn
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                async with asyncio.timeout(max(remaining, 0)):
                    await self._ready.wait()
            except TimeoutError:
                raise TransportError(
                    f"RabbitMQ unreachable at {redact(self.settings.url)} "
                    f"(waited {self.settings.publish_timeout:g}s for a reconnection)"
                ) from None

    async def _channel(self, which: str, deadline: float) -> aiormq.Channel:
        """The publishing (confirm mode) or control channel, reopened if an error closed it."""
        while True:
            conn = await self._connection(deadline)
            ch = self._pub if which == "pub" else self._ctl
            if ch is not None and not ch.is_closed:
                return ch
            async with self._channel_lock:
                ch = self._pub if which == "pub" else self._ctl
                if (ch is not None and not ch.is_closed) or conn is not self._conn:
                    continue
                try:
                    remaining = max(deadline - asyncio.get_running_loop().time(), 0.001)
                    ch = cast(
                        aiormq.Channel,
                        await conn.channel(
                            publisher_confirms=which == "pub",
                            frame_buffer_size=0,
                            timeout=remaining,
                        ),
                    )
                    if which == "pub":
                        self._pub = ch
                    else:
                        self._ctl = ch
                        await self._declare_base(ch)  # an error may mean something was deleted
                except (amqp_errors.AMQPConnectionError, RuntimeError, TimeoutError):
                    if asyncio.get_running_loop().time() >= deadline:
                        raise
                    await asyncio.sleep(0.05)  # the connection is going down: wait for the next

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.settings.publish_timeout

    # declarations -------------------------------------------------------------------------------

    async def declare_group(self, group: str, topics: Collection[str]) -> None:
        check_group(group)
        for topic in topics:
            if not topic or "*" in topic or "#" in topic or len(topic.encode()) > 255:
                raise ConfigurationError(
                    f"topic {topic!r}: use 1-255 bytes without '*' or '#' (AMQP routing keys)"
                )
        known = self._declared.get(group)
        missing = [t for t in dict.fromkeys(topics) if known is None or t not in known]
        if known is not None and not missing:
            return
        queue = self.queue(group)
        try:
            ch = await self._channel("ctl", self._deadline())
            if known is None:
                await ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
                await ch.queue_bind(queue, self._groups_ex, routing_key=f"#.{group}")
            for topic in missing:
                await ch.queue_bind(queue, self._events, routing_key=topic)
        except Exception as exc:
            raise translate(exc, f"declaring queue {queue!r}") from exc
        self._declared.setdefault(group, set()).update(missing)

    async def _declare_delays(self, top: int) -> None:
        """Declare the retry ladder up to rung ``top`` (each rung needs the one below)."""
        async with self._delay_lock:
            try:
                ch = await self._channel("ctl", self._deadline())
                for level in range(self._delay_top + 1, top + 1):
                    name, below = self._delay(level), self._delay(level - 1)
                    below = below if level else self._groups_ex
                    await ch.exchange_declare(name, exchange_type="topic", durable=True)
                    arguments: dict[str, Any] = {
                        "x-queue-type": "quorum",
                        "x-message-ttl": 1 << level,
                        "x-dead-letter-exchange": below,
                        "x-dead-letter-strategy": "at-least-once",
                        "x-overflow": "reject-publish",
                    }
                    await ch.queue_declare(name, durable=True, arguments=arguments)
                    skip = "*." * (DELAY_LEVELS - 1 - level)
                    await ch.queue_bind(name, name, routing_key=f"{skip}1.#")
                    await ch.exchange_bind(below, name, routing_key=f"{skip}0.#")
                    self._delay_top = level
            except Exception as exc:
                raise translate(exc, "declaring the delayed-retry queues") from exc

    # publishing ---------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        if self._closed:
            raise TransportError("RabbitMQ transport is closed (or not connected yet)")
        limit = self.max_message_bytes
        for message in messages:
            if len(message.body) > limit:
                raise PayloadTooLarge(
                    f"message {message.id} is {len(message.body)} bytes; the limit is {limit}"
                )
        outs: list[_Out] = []
        for m in messages:
            header = _header(m.id, m.topic, len(m.body))
            if m.group is None:
                outs.append(_Out(self._events, m.topic, header, m.body, m.id))
            else:
                outs.append(_Out(self._groups_ex, m.group, header, m.body, m.id))
        for group in {m.group for m in messages if m.group is not None}:
            await self.declare_group(group, ())
        await self._send(outs, mandatory=False)

    async def _send(self, outs: list[_Out], *, mandatory: bool) -> None:
        """Publish and wait for every confirm, window by window, re-sending what a lost
        connection left unconfirmed, until ``publish_timeout``."""
        loop = asyncio.get_running_loop()
        deadline = self._deadline()
        pending = outs
        while pending:
            size, count = 0, 0
            while count < min(len(pending), self.settings.publish_window) and size < _WINDOW_BYTES:
                size += len(pending[count].body)
                count += 1
            chunk, pending = pending[:count], pending[count:]
            failed, why = await self._send_window(chunk, mandatory, deadline)
            if failed:
                if loop.time() >= deadline:
                    raise translate(why or TimeoutError(), f"publishing {len(failed)} messages")
                await asyncio.sleep(0.05)  # the channel or connection went down: once more
            pending = failed + pending

    async def _send_window(
        self, chunk: list[_Out], mandatory: bool, deadline: float
    ) -> tuple[list[_Out], BaseException | None]:
        """Write one window and wait for its confirms; return what must be sent again, and why."""
        ch = await self._channel("pub", deadline)
        frame_max = ch.connection.connection_tune.frame_max or 131_072
        payload = b"".join(o.frames(ch.number, frame_max - 8, mandatory) for o in chunk)
        futures: list[asyncio.Future[Any]] = []
        try:
            async with ch.lock:  # the client's own publishes and RPCs take it too
                await ch.write_queue.put(ChannelFrame(payload=payload, should_close=False))
                # nothing awaits from here on: the confirms cannot arrive before they are awaited
                first = ch.delivery_tag + 1
                ch.delivery_tag += len(chunk)
                for tag, out in enumerate(chunk, first):
                    future = ch.create_future()
                    ch.confirmations[tag] = future
                    if mandatory:  # lets the client fail this future if the broker returns it
                        ch.message_id_delivery_tag[out.message_id] = tag
                    futures.append(future)
        except (amqp_errors.ChannelInvalidStateError, amqp_errors.AMQPError) as exc:
            return chunk, exc
        remaining = deadline - asyncio.get_running_loop().time()
        _, waiting = await asyncio.wait(futures, timeout=max(remaining, 0))
        if mandatory:
            for out in chunk:
                ch.message_id_delivery_tag.pop(out.message_id, None)
        if waiting:
            raise TransportError(
                f"RabbitMQ: no publisher confirm within {self.settings.publish_timeout:g}s"
            )
        failed: list[_Out] = []
        why: BaseException | None = None
        for out, future in zip(chunk, futures, strict=True):
            error = asyncio.CancelledError() if future.cancelled() else future.exception()
            if isinstance(error, amqp_errors.DeliveryError):
                raise translate(error, f"publishing to {out.exchange!r} {out.routing_key!r}")
            if error is not None:  # the channel or connection closed before the confirm
                failed.append(out)
                why = error
        return failed, why

    # dead letters -------------------------------------------------------------------------------

    async def _scan(self) -> dict[str, DeadLetter]:
        """Read the dead-letter stream from its start to a marker written now: the live dead
        letters, oldest first (a tombstone removes the record it names)."""
        if not self._dlq_declared:
            if await self._length(self._dlq) is None:
                return {}  # nothing was ever dead-lettered in this namespace
            await self._declare_dlq()
        marker = uuid.uuid4().hex
        props = spec.Basic.Properties(delivery_mode=2, message_id=marker, headers={_KIND: "marker"})
        out = _Out(self._groups_ex, _DLQ_KEY, _rich_header(props, 0), b"", marker)
        await self._send([out], mandatory=True)
        found: dict[str, DeadLetter] = {}
        reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ch: aiormq.Channel | None = None

        async def on_record(m: DeliveredMessage) -> None:
            p = m.header.properties
            headers = p.headers or {}
            kind, key = headers.get(_KIND), _str(headers.get(_DL_ID))
            if kind == "dead":
                failure = Failure(
                    _str(headers.get(_REASON)),
                    _str(headers.get(_ERROR_TYPE)),
                    _str(headers.get(_ERROR)),
                )
                message = Message(p.message_id or "", p.message_type or "", m.body)
                failed_at = _int(headers.get(_FAILED_AT), 0) / 1000
                group = _str(headers.get(_GROUP))
                attempts = _int(headers.get(_ATTEMPTS), 1)
                found[key] = DeadLetter(key, group, message, failure, attempts, failed_at)
            elif kind == "removed":
                found.pop(key, None)
            elif kind == "marker" and p.message_id == marker and not reached.done():
                reached.set_result(None)
            tag = cast(spec.Basic.Deliver, m.delivery).delivery_tag
            if tag is not None and tag % 500 == 0 and ch is not None:  # stream credit
                await ch.basic_ack(tag, multiple=True)

        try:
            conn = await self._connection(self._deadline())
            ch = cast(aiormq.Channel, await conn.channel(publisher_confirms=False))
            await ch.basic_qos(prefetch_count=1000)
            await ch.basic_consume(self._dlq, on_record, arguments={"x-stream-offset": "first"})
            async with asyncio.timeout(self.settings.publish_timeout):
                await reached
        except Exception as exc:
            raise translate(exc, "reading the dead letters") from exc
        finally:
            if ch is not None:
                with contextlib.suppress(Exception):
                    await ch.close()
        return found

    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        found = (await self._scan()).values()
        return [d for d in found if group is None or d.group == group][: max(limit, 0)]

    async def _remove(self, dead: DeadLetter) -> None:
        props = spec.Basic.Properties(
            delivery_mode=2, message_id=dead.message.id, headers={_KIND: "removed", _DL_ID: dead.id}
        )
        out = _Out(self._groups_ex, _DLQ_KEY, _rich_header(props, 0), b"", dead.message.id)
        await self._send([out], mandatory=True)

    async def replay(self, dead_letter_id: str, body: bytes | None = None) -> bool:
        dead = (await self._scan()).get(dead_letter_id)
        if dead is None:
            return False
        message = dead.message
        new_body = message.body if body is None else body
        if len(new_body) > self.max_message_bytes:
            raise PayloadTooLarge(f"replayed body is {len(new_body)} bytes")
        await self.declare_group(dead.group, ())
        header = _header(message.id, message.topic, len(new_body))
        out = _Out(self._groups_ex, dead.group, header, new_body, message.id)
        await self._send([out], mandatory=True)  # first: a crash in between replays it twice
        await self._remove(dead)
        return True

    async def discard(self, dead_letter_id: str) -> bool:
        dead = (await self._scan()).get(dead_letter_id)
        if dead is None:
            return False
        await self._remove(dead)
        return True

    async def lag(self, group: str) -> int | None:
        return await self._length(self.queue(group))

    async def _length(self, queue: str) -> int | None:
        """Ready messages in ``queue`` (a passive declare), None if it does not exist."""
        try:
            conn = await self._connection(self._deadline())
            ch = await conn.channel(publisher_confirms=False)
            try:
                ok = await ch.queue_declare(queue, passive=True)
            finally:
                with contextlib.suppress(Exception):
                    await ch.close()
        except amqp_errors.ChannelNotFoundEntity:
            return None
        except Exception as exc:
            raise translate(exc, f"reading the length of {queue!r}") from exc
        return ok.message_count

    async def delete_namespace(self, groups: Collection[str] = ()) -> None:
        """Delete this namespace from the broker, messages included: the queues of ``groups`` and
        of every group this transport declared, the retry ladder, the dead letters and the
        exchanges. For tests, demos and decommissioning. (AMQP cannot list queues: name the
        groups that only other processes declared.)"""
        try:
            ch = await self._channel("ctl", self._deadline())
            for group in {*self._declared, *groups}:
                await ch.queue_delete(self.queue(group))
            await ch.queue_delete(self._dlq)
            for level in range(DELAY_LEVELS):
                await ch.queue_delete(self._delay(level))
                await ch.exchange_delete(self._delay(level))
            for exchange in (self._events, self._groups_ex):
                await ch.exchange_delete(exchange)
        except Exception as exc:
            raise translate(exc, f"deleting namespace {self.settings.namespace!r}") from exc
        self._declared.clear()
        self._delay_top = -1
        self._dlq_declared = False

    # members ------------------------------------------------------------------------------------

    async def subscribe(
        self, group: str, topics: Collection[str], *, lease: float = 30.0
    ) -> RabbitMQSubscription:
        if self._closed:
            raise TransportError("RabbitMQ transport is closed (or not connected yet)")
        if lease <= 0:
            raise ConfigurationError("lease must be positive seconds")
        await self.declare_group(group, topics)
        sub = RabbitMQSubscription(self, group, frozenset(topics), lease)
        try:
            await sub._open()
        except Exception as exc:
            raise translate(exc, f"subscribing to {self.queue(group)!r}") from exc
        self._subscriptions.add(sub)
        return sub

    def retry_route(self, group: str, delay: float) -> tuple[str, str, int]:
        """Exchange and routing key that bring a message back to ``group`` after ``delay``
        seconds (rounded up to the millisecond), and the ladder rung it enters (-1: none)."""
        ms = math.ceil(round(max(delay, 0.0) * 1000, 6))
        if ms == 0:
            return self._groups_ex, group, -1
        if ms >= 1 << DELAY_LEVELS:
            raise ConfigurationError(f"retry delay {delay}s is over RabbitMQ's longest (49.7 days)")
        top = ms.bit_length() - 1
        return self._delay(top), ".".join(format(ms, f"0{DELAY_LEVELS}b")) + f".{group}", top


@dataclass(slots=True)
class _Handle:
    epoch: int
    """Which channel of the member delivered it: tags of an older channel are void."""
    tag: int
    held: bool = False
    """Handed to the application and not settled yet."""


class RabbitMQSubscription(Subscription):
    """One consumer on its own channel. It consumes only while the application asks: after
    ``idle`` seconds without a pending receive it cancels its consumer and gives its buffered
    messages back, so that a member that stopped receiving does not sit on messages others could
    handle."""

    def __init__(self, bus: RabbitMQTransport, group: str, topics: frozenset[str], lease: float):
        self._bus = bus
        self.group = group
        self.topics = topics
        self._lease = lease
        self._idle = min(max(lease / 2, 0.5), 5.0)
        self._tick = min(max(lease / 4, 0.05), 1.0)
        self._queue = bus.queue(group)
        self._ch: aiormq.Channel | None = None
        self._epoch = 0
        self._ctag: str | None = None
        self._buffer: deque[Delivery] = deque()
        self._outstanding: dict[int, Delivery] = {}
        """Every unacked delivery of the current channel (buffered or held), in tag order."""
        self._leases: deque[tuple[float, Delivery]] = deque()
        self._arrived = asyncio.Event()
        self._lock = asyncio.Lock()
        self._settle_lock = asyncio.Lock()
        self._receivers = 0
        self._last_receive = 0.0
        self._closed = False
        self._keeper: asyncio.Task[None] | None = None

    # channel and consumer -----------------------------------------------------------------------

    async def _open(self) -> None:
        conn = await self._bus._connection(self._bus._deadline())
        ch = cast(aiormq.Channel, await conn.channel(publisher_confirms=False, frame_buffer_size=0))
        await ch.basic_qos(prefetch_count=self._bus.settings.prefetch)
        self._epoch += 1
        epoch = self._epoch
        ch.closing.add_done_callback(lambda f: self._channel_lost(epoch, f))
        ch.on_consumer_cancel_callbacks.add(self._cancelled_by_broker)
        self._ch, self._ctag = ch, None
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep(), name=f"amqp member {self.group}")

    def _channel_lost(self, epoch: int, closing: asyncio.Future[Any]) -> None:
        if not closing.cancelled():
            closing.exception()
        if epoch != self._epoch:
            return
        # the broker puts back whatever this channel held: forget it, acks would be void
        self._ch, self._ctag = None, None
        self._buffer.clear()
        self._outstanding.clear()
        self._leases.clear()
        self._arrived.set()

    def _cancelled_by_broker(self, _: object) -> None:
        self._ctag = None  # e.g. the queue was deleted; the next receive consumes again

    def _reconnected(self) -> None:
        """Called by the transport after a reconnection: resume if someone is receiving."""
        self._arrived.set()

    async def _activate(self) -> None:
        async with self._lock:
            if self._closed:
                return
            if self._ch is None or self._ch.is_closed:
                await self._open()
            if self._ctag is None and self._ch is not None:
                ok = await self._ch.basic_consume(self._queue, self._on_message)
                self._ctag = ok.consumer_tag

    async def _deactivate(self) -> None:
        async with self._lock:
            ch, tag = self._ch, self._ctag
            if ch is None or tag is None:
                return
            await ch.basic_cancel(tag)
            self._ctag = None
            await asyncio.sleep(0)  # deliveries sent before the cancel-ok are all in now
            buffered = list(self._buffer)
            self._buffer.clear()
            await self._give_back(buffered)

    async def _on_message(self, m: DeliveredMessage) -> None:
        if m.channel is not self._ch:
            return  # a closing channel's: the broker redelivers it
        frame = cast(spec.Basic.Deliver, m.delivery)
        props = m.header.properties
        headers = props.headers
        attempt = 1
        if headers:
            attempt = max(_int(headers.get(ATTEMPT), 1), 1) + _int(
                headers.get("x-delivery-count"), 0
            )
        message = Message(
            props.message_id or "", props.message_type or frame.routing_key or "", m.body
        )
        tag = cast(int, frame.delivery_tag)
        delivery = Delivery(message, attempt, _Handle(self._epoch, tag))
        self._outstanding[tag] = delivery
        self._buffer.append(delivery)
        self._arrived.set()

    # the application's side ---------------------------------------------------------------------

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        if self._closed:
            raise TransportError("subscription is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0)
        self._receivers += 1
        try:
            while not self._buffer and not self._closed:
                if self._ctag is None and self._bus._ready.is_set():
                    try:  # shielded: a cancelled AMQP call would close the channel
                        await _shielded(self._activate())
                    except Exception as exc:
                        if self._bus._ready.is_set():
                            raise translate(exc, f"consuming from {self._queue!r}") from exc
                    if self._buffer:
                        break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()
            return [] if self._closed else self._take(max_messages)
        finally:
            self._receivers -= 1
            self._last_receive = loop.time()

    def _take(self, max_messages: int) -> list[Delivery]:
        """Hand out buffered deliveries (no await: a cancelled receive loses nothing)."""
        taken: list[Delivery] = []
        until = asyncio.get_running_loop().time() + self._lease
        while self._buffer and len(taken) < max_messages:
            delivery = self._buffer.popleft()
            handle = cast(_Handle, delivery.handle)
            if handle.epoch == self._epoch and handle.tag in self._outstanding:
                handle.held = True
                self._leases.append((until, delivery))
                taken.append(delivery)
        return taken

    def _claim(self, delivery: Delivery) -> bool:
        """Start settling ``delivery``: False if it is not (or no longer) held by this member."""
        handle = delivery.handle
        if not isinstance(handle, _Handle) or not handle.held or handle.epoch != self._epoch:
            return False
        if self._outstanding.get(handle.tag) is not delivery:
            return False
        handle.held = False
        return True

    def _hold_again(self, delivery: Delivery) -> None:
        """A settlement failed: the delivery is the application's again, with a fresh lease."""
        cast(_Handle, delivery.handle).held = True
        self._leases.append((asyncio.get_running_loop().time() + self._lease, delivery))

    async def _settle(self, deliveries: Sequence[Delivery], *, requeue: bool = False) -> None:
        """Ack (or nack with requeue) claimed deliveries. One multiple-ack covers every tag below
        the oldest delivery still outstanding; the rest are acked one by one. Settlements are
        serialized and each is written at once: a multiple-ack must never overtake the nack of
        a tag it covers (the broker would close the channel on the unknown tag)."""
        async with self._settle_lock:
            ch = self._ch
            tags = sorted(
                h.tag
                for h in (cast(_Handle, d.handle) for d in deliveries)
                if h.epoch == self._epoch and self._outstanding.pop(h.tag, None) is not None
            )
            if not tags or ch is None or ch.is_closed:
                return  # a lost channel's deliveries are back in the queue already
            frames: list[spec.Basic.Ack | spec.Basic.Nack]
            if requeue:
                frames = [spec.Basic.Nack(tag, requeue=True) for tag in tags]
            else:
                oldest = next(iter(self._outstanding), None)
                covered = [t for t in tags if oldest is None or t < oldest]
                frames = [spec.Basic.Ack(covered[-1], len(covered) > 1)] if covered else []
                frames += [spec.Basic.Ack(tag) for tag in tags[len(covered) :]]
            await ch.write_queue.put(ChannelFrame.marshall(ch.number, frames))

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        await self._settle([d for d in deliveries if self._claim(d)])

    async def retry(self, delivery: Delivery, delay: float) -> None:
        exchange, key, top = self._bus.retry_route(self.group, delay)
        if not self._claim(delivery):
            return
        message = delivery.message
        try:
            if top > self._bus._delay_top:
                await self._bus._declare_delays(top)
            header = _header(message.id, message.topic, len(message.body), delivery.attempt + 1)
            out = _Out(exchange, key, header, message.body, message.id)
            await self._bus._send([out], mandatory=True)
        except BaseException as exc:
            self._hold_again(delivery)
            if isinstance(exc, Exception):
                raise translate(exc, f"retrying {message.id}") from exc
            raise
        await self._settle([delivery])

    async def dead_letter(self, delivery: Delivery, failure: Failure) -> None:
        if not self._claim(delivery):
            return
        message = delivery.message
        error = failure.error.encode()[:_MAX_ERROR_BYTES].decode(errors="ignore")
        headers: dict[str, Any] = {
            _KIND: "dead",
            _DL_ID: uuid.uuid4().hex,
            _GROUP: self.group,
            _REASON: failure.reason[:1000],
            _ERROR_TYPE: failure.error_type[:200],
            _ERROR: error,
            _ATTEMPTS: delivery.attempt,
            _FAILED_AT: round(time.time() * 1000),  # an int: AMQP tables carry floats as float32
        }
        props = spec.Basic.Properties(
            delivery_mode=2, message_id=message.id, message_type=message.topic, headers=headers
        )
        out = _Out(
            self._bus._groups_ex,
            _DLQ_KEY,
            _rich_header(props, len(message.body)),
            message.body,
            message.id,
        )
        try:
            await self._bus._declare_dlq()
            await self._bus._send([out], mandatory=True)  # stored before it leaves the queue
        except BaseException as exc:
            self._hold_again(delivery)
            if isinstance(exc, Exception):
                raise translate(exc, f"dead-lettering {message.id}") from exc
            raise
        await self._settle([delivery])

    async def _give_back(self, deliveries: list[Delivery]) -> None:
        """Return deliveries to the group with their attempt unchanged: re-publish a copy to the
        group's queue (confirmed), then ack. If that fails, nack them (the broker counts one
        attempt more) rather than keep them."""
        live = [d for d in deliveries if self._outstanding.get(cast(_Handle, d.handle).tag) is d]
        if not live:
            return
        outs = []
        for d in live:
            m = d.message
            header = _header(m.id, m.topic, len(m.body), d.attempt)
            outs.append(_Out(self._bus._groups_ex, self.group, header, m.body, m.id))
        try:
            async with asyncio.timeout(10):
                await self._bus._send(outs, mandatory=True)
        except Exception as exc:  # fall back to the broker's requeue
            log.info("RabbitMQ: could not re-publish %d deliveries (%s); nacking", len(live), exc)
            await self._settle(live, requeue=True)
            return
        await self._settle(live)

    async def _keep(self) -> None:
        """Expire leases (nack → redelivered with attempt + 1) and stop consuming when idle."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(self._tick)
            try:
                now = loop.time()
                expired: list[Delivery] = []
                while self._leases:  # oldest first; settled ones go too, so this stays short
                    until, delivery = self._leases[0]
                    held = cast(_Handle, delivery.handle).held
                    if held and until > now:
                        break
                    self._leases.popleft()
                    if held and self._claim(delivery):
                        expired.append(delivery)
                if expired:
                    log.info("RabbitMQ: %d leases of %s ran out", len(expired), self.group)
                    await self._settle(expired, requeue=True)
                if self._receivers == 0 and now - self._last_receive >= self._idle:
                    if self._ctag is not None:
                        await self._deactivate()
                    elif self._buffer:  # stragglers that came in after a cancel
                        async with self._lock:
                            buffered = list(self._buffer)
                            self._buffer.clear()
                            await self._give_back(buffered)
            except Exception as exc:  # survive a lost connection
                log.info("RabbitMQ: member upkeep of %s failed: %s", self.group, exc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._arrived.set()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        async with self._lock:
            ch = self._ch
            if ch is not None and not ch.is_closed:
                with contextlib.suppress(Exception):
                    if self._ctag is not None:
                        await ch.basic_cancel(self._ctag)
                        await asyncio.sleep(0)
                    self._buffer.clear()
                    for delivery in self._outstanding.values():
                        cast(_Handle, delivery.handle).held = False
                    await self._give_back(list(self._outstanding.values()))
                with contextlib.suppress(Exception):
                    await ch.close()  # anything still unacked goes back to the queue
            self._ch, self._ctag = None, None
        self._bus._subscriptions.discard(self)


async def _shielded(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run to completion even if the caller is cancelled (an error is then dropped: the next
    receive tries again)."""
    task = asyncio.ensure_future(coroutine)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    await asyncio.shield(task)
