"""A member's channel and consumer: consuming while asked, the buffer, settling by tag, leases."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import aiormq
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as spec

from choreograph.transport import Delivery, Failure, Message
from choreograph.transports.rabbitmq._frames import (
    ATTEMPT,
    ERROR,
    ERROR_TYPE,
    KIND,
    REASON,
    REFUSED,
    Out,
    content_header,
    int_value,
    str_value,
)

if TYPE_CHECKING:
    from choreograph.transports.rabbitmq._transport import RabbitMQTransport

log = logging.getLogger("choreograph.transports.rabbitmq")


@dataclass(slots=True)
class Handle:
    epoch: int
    """Which channel of the member delivered it: tags of an older channel are void."""
    tag: int
    held: bool = False
    """Handed to the application and not settled yet."""
    refused: Failure | None = None
    """Set on a reference to an oversized message: dead-lettered on receipt, never handed out."""


class Consumer:
    """The machinery under :class:`RabbitMQSubscription`: its channel (opened again after a loss),
    its consumer, the deliveries buffered and held, settling them, and the upkeep of leases."""

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
        refused = None
        if headers:
            attempt = max(int_value(headers.get(ATTEMPT), 1), 1) + int_value(
                headers.get("x-delivery-count"), 0
            )
            if headers.get(KIND) == REFUSED:
                refused = Failure(str_value(headers.get(REASON)) or "payload too large",
                                  str_value(headers.get(ERROR_TYPE)),
                                  str_value(headers.get(ERROR)))  # fmt: skip
        message = Message(
            props.message_id or "", props.message_type or frame.routing_key or "", m.body
        )
        tag = cast(int, frame.delivery_tag)
        delivery = Delivery(message, attempt, Handle(self._epoch, tag, refused=refused))
        self._outstanding[tag] = delivery
        self._buffer.append(delivery)
        self._arrived.set()

    # settling -----------------------------------------------------------------------------------

    def _claim(self, delivery: Delivery) -> bool:
        """Start settling ``delivery``: False if it is not (or no longer) held by this member."""
        handle = delivery.handle
        if not isinstance(handle, Handle) or not handle.held or handle.epoch != self._epoch:
            return False
        if self._outstanding.get(handle.tag) is not delivery:
            return False
        handle.held = False
        return True

    async def _settle(self, deliveries: Sequence[Delivery], *, requeue: bool = False) -> None:
        """Ack (or nack with requeue) claimed deliveries. One multiple-ack covers every tag below
        the oldest delivery still outstanding; the rest are acked one by one. Settlements are
        serialized and each is written at once: a multiple-ack must never overtake the nack of
        a tag it covers (the broker would close the channel on the unknown tag)."""
        async with self._settle_lock:
            ch = self._ch
            tags = sorted(
                h.tag
                for h in (cast(Handle, d.handle) for d in deliveries)
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

    async def _give_back(self, deliveries: list[Delivery]) -> None:
        """Return deliveries to the group with their attempt unchanged: re-publish a copy to the
        group's queue (confirmed), then ack. If that fails, nack them (the broker counts one
        attempt more) rather than keep them."""
        live = [d for d in deliveries if self._outstanding.get(cast(Handle, d.handle).tag) is d]
        if not live:
            return
        outs = []
        for d in live:
            m = d.message
            header = content_header(m.id, m.topic, len(m.body), d.attempt)
            outs.append(Out(self._bus._groups_ex, self.group, header, m.body, m.id))
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
                    held = cast(Handle, delivery.handle).held
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
