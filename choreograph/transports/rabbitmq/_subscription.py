"""A member of a group, as the application sees it: receive, ack, retry, dead-letter, close."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any, cast

from pamqp import commands as spec

from choreograph.errors import TransportError
from choreograph.transport import Delivery, Failure, Subscription
from choreograph.transports.rabbitmq._consumer import Consumer, Handle
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
    TRACEBACK,
    Out,
    content_header,
    rich_header,
)


class RabbitMQSubscription(Consumer, Subscription):
    """One consumer on its own channel. It consumes only while the application asks: after
    ``idle`` seconds without a pending receive it cancels its consumer and gives its buffered
    messages back, so that a member that stopped receiving does not sit on messages others could
    handle."""

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
            if self._closed:
                return []
            taken = self._take(max_messages)
        finally:
            self._receivers -= 1
            self._last_receive = loop.time()
        refused = [d for d in taken if cast(Handle, d.handle).refused is not None]
        for delivery in refused:  # shielded: a cancelled receive leaves no half-written record
            await _shielded(self.dead_letter(delivery, cast(Failure, delivery.handle.refused)))
        return [d for d in taken if cast(Handle, d.handle).refused is None] if refused else taken

    def _take(self, max_messages: int) -> list[Delivery]:
        """Hand out buffered deliveries (no await: a cancelled receive loses nothing)."""
        taken: list[Delivery] = []
        until = asyncio.get_running_loop().time() + self._lease
        while self._buffer and len(taken) < max_messages:
            delivery = self._buffer.popleft()
            handle = cast(Handle, delivery.handle)
            if handle.epoch == self._epoch and handle.tag in self._outstanding:
                handle.held = True
                self._leases.append((until, delivery))
                taken.append(delivery)
        return taken

    def _hold_again(self, delivery: Delivery) -> None:
        """A settlement failed: the delivery is the application's again, with a fresh lease."""
        cast(Handle, delivery.handle).held = True
        self._leases.append((asyncio.get_running_loop().time() + self._lease, delivery))

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
            header = content_header(
                message.id, message.topic, len(message.body), delivery.attempt + 1
            )
            out = Out(exchange, key, header, message.body, message.id)
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
        budget = self._bus.header_budget()
        error = failure.error.encode()[:budget].decode(errors="ignore")
        # the traceback gets what the error text left of the budget; its end is where it raised
        room = budget - len(error.encode())
        trace = failure.traceback.encode()[-room:] if room > 0 else b""
        headers: dict[str, Any] = {
            KIND: "dead",
            DL_ID: uuid.uuid4().hex,
            GROUP: self.group,
            REASON: failure.reason.encode()[:500].decode(errors="ignore"),
            ERROR_TYPE: failure.error_type.encode()[:200].decode(errors="ignore"),
            ERROR: error,
            TRACEBACK: trace.decode(errors="ignore"),
            ATTEMPTS: delivery.attempt,
            FAILED_AT: round(time.time() * 1000),  # an int: AMQP tables carry floats as float32
        }
        props = spec.Basic.Properties(
            delivery_mode=2, message_id=message.id, message_type=message.topic, headers=headers
        )
        out = Out(
            self._bus._groups_ex,
            DLQ_KEY,
            rich_header(props, len(message.body)),
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
                        cast(Handle, delivery.handle).held = False
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
