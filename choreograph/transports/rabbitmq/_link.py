"""What every RabbitMQ operation stands on: the connection, its channels, confirmed publishing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, cast

import aiormq
import aiormq.exceptions as amqp_errors
from aiormq.abc import ChannelFrame

from choreograph.errors import TransportError
from choreograph.transport import Transport, redact
from choreograph.transports.rabbitmq._errors import translate
from choreograph.transports.rabbitmq._frames import Out, header_budget
from choreograph.transports.rabbitmq._settings import RabbitMQSettings

if TYPE_CHECKING:
    from choreograph.transports.rabbitmq._subscription import RabbitMQSubscription

log = logging.getLogger("choreograph.transports.rabbitmq")

_WINDOW_BYTES = 4 << 20  # a publish window also stops at this many bytes of bodies


class Link(Transport):
    """The connection to the broker, opened again after it drops (then every member consumes
    again), its publishing and control channels, and publishing with confirms. The contract
    itself is :class:`RabbitMQTransport`'s, on top of this."""

    def __init__(self, settings: RabbitMQSettings) -> None:
        self.settings = settings
        self.max_message_bytes = min(self.max_message_bytes, settings.max_message_size)
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

    def header_budget(self) -> int:
        """Bytes of failure text a dead letter's headers may carry on this connection."""
        tune = self._conn.connection_tune if self._conn is not None else None
        return header_budget((tune.frame_max if tune is not None else 0) or 131_072)

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.settings.publish_timeout

    # publishing ---------------------------------------------------------------------------------

    async def _send(self, outs: list[Out], *, mandatory: bool) -> None:
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
        self, chunk: list[Out], mandatory: bool, deadline: float
    ) -> tuple[list[Out], BaseException | None]:
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
        failed: list[Out] = []
        why: BaseException | None = None
        for out, future in zip(chunk, futures, strict=True):
            error = asyncio.CancelledError() if future.cancelled() else future.exception()
            if isinstance(error, amqp_errors.DeliveryError):
                raise translate(error, f"publishing to {out.exchange!r} {out.routing_key!r}")
            if error is not None:  # the channel or connection closed before the confirm
                failed.append(out)
                why = error
        return failed, why
