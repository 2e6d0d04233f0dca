"""The ``amqp://`` transport: groups, the retry ladder, publishing, dead letters, members."""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import Collection, Sequence
from typing import Any, Self, cast

import aiormq
import aiormq.exceptions as amqp_errors
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

from choreograph.errors import ConfigurationError, PayloadTooLarge, TransportError
from choreograph.transport import (
    DeadLetter,
    Failure,
    Message,
    check_group,
    oversized,
    split_oversized,
)
from choreograph.transports.rabbitmq._errors import translate
from choreograph.transports.rabbitmq._frames import (
    ATTEMPTS,
    DL_ID,
    DLQ_KEY,
    ERROR,
    ERROR_TYPE,
    FAILED_AT,
    GROUP,
    KIND,
    REASON,
    REFUSED,
    TRACEBACK,
    Out,
    content_header,
    int_value,
    rich_header,
    str_value,
)
from choreograph.transports.rabbitmq._link import Link
from choreograph.transports.rabbitmq._settings import RabbitMQSettings
from choreograph.transports.rabbitmq._subscription import RabbitMQSubscription

DELAY_LEVELS = 32
"""Rungs of the retry ladder: the longest retry delay is 2**32 - 1 ms (about 49.7 days)."""


class RabbitMQTransport(Link):
    scheme = "amqp"
    member_order = "group"
    gives_back_in_order = True

    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(RabbitMQSettings.from_url(url))

    def queue(self, group: str) -> str:
        return f"{self.settings.namespace}.g.{group}"

    def _delay(self, level: int) -> str:
        return f"{self.settings.namespace}.delay.{level}"

    # declarations -------------------------------------------------------------------------------

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
            await ch.queue_bind(self._dlq, self._groups_ex, routing_key=DLQ_KEY)
        except Exception as exc:
            raise translate(exc, f"declaring the dead-letter stream {self._dlq!r}") from exc
        self._dlq_declared = True

    def orders_across_members(self, group: str) -> bool:
        return group in self.settings.single_active_groups

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
                arguments: dict[str, Any] = {"x-queue-type": "quorum"}
                if group in self.settings.single_active_groups:
                    arguments["x-single-active-consumer"] = True
                await ch.queue_declare(queue, durable=True, arguments=arguments)
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
        fits, over = split_oversized(messages, self.max_message_bytes)
        outs: list[Out] = []
        for m in fits:
            header = content_header(m.id, m.topic, len(m.body))
            outs.append(self._routed(m, header))
        for m in over:  # routed like the message; the member receiving it dead-letters it
            ref, why = oversized(m, self.max_message_bytes)
            headers: dict[str, Any] = {KIND: REFUSED, REASON: why.reason,
                                       ERROR_TYPE: why.error_type, ERROR: why.error}  # fmt: skip
            props = spec.Basic.Properties(
                delivery_mode=2, message_id=ref.id, message_type=ref.topic, headers=headers
            )
            outs.append(self._routed(ref, rich_header(props, len(ref.body))))
        for group in {m.group for m in messages if m.group is not None}:
            await self.declare_group(group, ())
        await self._send(outs, mandatory=False)

    def _routed(self, message: Message, header: bytes) -> Out:
        if message.group is None:
            return Out(self._events, message.topic, header, message.body, message.id)
        return Out(self._groups_ex, message.group, header, message.body, message.id)

    # dead letters -------------------------------------------------------------------------------

    async def _scan(self, only: str | None = None) -> dict[str, DeadLetter]:
        """Read the dead-letter stream from its start to a marker written now: the live dead
        letters, oldest first (a tombstone removes the record it names). With ``only``, just
        that one is kept, so finding one letter holds one in memory."""
        if not self._dlq_declared:
            if await self._length(self._dlq) is None:
                return {}  # nothing was ever dead-lettered in this namespace
            await self._declare_dlq()
        marker = uuid.uuid4().hex
        props = spec.Basic.Properties(delivery_mode=2, message_id=marker, headers={KIND: "marker"})
        out = Out(self._groups_ex, DLQ_KEY, rich_header(props, 0), b"", marker)
        await self._send([out], mandatory=True)
        found: dict[str, DeadLetter] = {}
        reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ch: aiormq.Channel | None = None

        async def on_record(m: DeliveredMessage) -> None:
            p = m.header.properties
            headers = p.headers or {}
            kind, key = headers.get(KIND), str_value(headers.get(DL_ID))
            if kind == "dead" and (only is None or key == only):
                failure = Failure(
                    str_value(headers.get(REASON)),
                    str_value(headers.get(ERROR_TYPE)),
                    str_value(headers.get(ERROR)),
                    str_value(headers.get(TRACEBACK)),
                )
                message = Message(p.message_id or "", p.message_type or "", m.body)
                failed_at = int_value(headers.get(FAILED_AT), 0) / 1000
                group = str_value(headers.get(GROUP))
                attempts = int_value(headers.get(ATTEMPTS), 1)
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
            delivery_mode=2, message_id=dead.message.id, headers={KIND: "removed", DL_ID: dead.id}
        )
        out = Out(self._groups_ex, DLQ_KEY, rich_header(props, 0), b"", dead.message.id)
        await self._send([out], mandatory=True)

    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        return (await self._scan(only=dead_letter_id)).get(dead_letter_id)

    async def replay(self, dead_letter_id: str, body: bytes | None = None) -> bool:
        dead = await self.get_dead_letter(dead_letter_id)
        if dead is None:
            return False
        message = dead.message
        new_body = message.body if body is None else body
        if len(new_body) > self.max_message_bytes:
            raise PayloadTooLarge(f"replayed body is {len(new_body)} bytes")
        await self.declare_group(dead.group, ())
        header = content_header(message.id, message.topic, len(new_body))
        out = Out(self._groups_ex, dead.group, header, new_body, message.id)
        await self._send([out], mandatory=True)  # first: a crash in between replays it twice
        await self._remove(dead)
        return True

    async def discard(self, dead_letter_id: str) -> bool:
        dead = await self.get_dead_letter(dead_letter_id)
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
