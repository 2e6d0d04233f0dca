"""A member of a group: pulls from the group's durable consumers, hands over, settles.

Pulling, and why it is shaped this way
    A member sends pull requests only for messages it is about to hand over, so a message is
    never delivered to a member that did not ask for it (a delivery counts as an attempt in
    JetStream, and a message sitting unasked in a member's buffer would wait there for its lease).
    It still keeps the pipe full when there is a backlog:

    * ``receive`` with nothing buffered sends, per consumer, a *lingering* request
      ``{batch, no_wait, expires}``: the server holds it until a message comes, then sends what
      is there (up to ``batch``) and ends it at once;
    * when ``receive`` hands over a batch and the consumer reported more waiting (the
      ``num_pending`` of the last delivery), it sends a *prefetch* request ``{batch, no_wait}``:
      the next batch streams in while the caller handles this one, and the request ends as soon
      as the backlog is drained (no message published later is taken by it);
    * ``receive`` hands over whatever has arrived at once, without waiting for a request that
      is still delivering to fill the batch: what it delivers meanwhile waits in the buffer for
      the next call. Batches grow by themselves when messages come faster than they are
      handled, and an idle member answers in one round trip.

    At most one request per consumer is outstanding per member, so counting deliveries tells
    exactly when it is spent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import nats.errors as ne
from nats.aio.msg import Msg

from choreograph.errors import InvalidMessage, TransportError
from choreograph.transport import Delivery, Failure, Message, Subscription
from choreograph.transports.nats._client import Inbox
from choreograph.transports.nats._errors import translated
from choreograph.transports.nats._names import ID_HEADER, message_id

if TYPE_CHECKING:
    from choreograph.transports.nats._transport import NatsTransport

log = logging.getLogger("choreograph.transports.nats")

_LINGER_GRACE = 1.0
"""Seconds past its ``expires`` after which an unanswered request is presumed lost."""
_HEARTBEAT = 1.0
"""Seconds between the idle heartbeats the server sends on a lingering request of more than
:data:`_HEARTBEAT_FROM` seconds; three missed ones and the request is presumed lost (its
consumer's leader died, or the request did), and sent again."""
_HEARTBEAT_FROM = 3.0
_PREFETCH_LOST = 3.0
"""Seconds after which an unfinished prefetch request is presumed lost."""
_BACKOFF = 0.05
"""Seconds before asking a consumer again after the server refused a request."""
_MIN_EXPIRES = 0.01
_IDLE_POLL = 0.05
"""While a member works through one consumer's backlog, it asks each other consumer at least this
often (seconds) whether it has something, so no topic of the group is starved."""
_KEEP_MIN = 0.2
_PROGRESS = b"+WPI"
_ACK = b""
_NAK = b"-NAK"
_TERM = b"+TERM"


class _Request:
    __slots__ = ("delivered", "inbox", "lost_at", "remaining")

    def __init__(self, inbox: str, batch: int, lost_at: float) -> None:
        self.inbox = inbox
        self.remaining = batch
        self.delivered = 0
        self.lost_at = lost_at


class _Consumer:
    __slots__ = ("asked_at", "backlog", "name", "next_request", "not_before", "request")

    def __init__(self, name: str, next_request: str) -> None:
        self.name = name
        self.next_request = next_request
        self.request: _Request | None = None
        self.backlog = 0
        """``num_pending`` of the last delivery: messages the server still had for us."""
        self.not_before = 0.0
        self.asked_at = 0.0


class NatsSubscription(Subscription):
    def __init__(
        self,
        transport: NatsTransport,
        group: str,
        topics: frozenset[str],
        consumers: list[str],
        lease: float,
    ) -> None:
        self._transport = transport
        self._client = transport._client
        self.group = group
        self.topics = topics
        names = transport._names
        self._consumers = {name: _Consumer(name, names.next_request(name)) for name in consumers}
        self._by_inbox: dict[str, _Consumer] = {}
        self._buffer: deque[tuple[Msg, list[str], float]] = deque()
        self._unsettled: dict[str, tuple[Msg, float]] = {}
        """Handed over and not settled yet, by ack subject, with the time they arrived."""
        self._lease = lease
        self._keeper: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        self._arrivals = 0
        self._inbox = ""
        self._sub: Inbox | None = None
        self._request_ids = 0
        self._malformed: list[tuple[Delivery, ValueError]] = []
        """Received on a subject this transport never writes: dead-lettered, not handed over."""
        self._closed = False
        self._clock = asyncio.get_running_loop().time

    async def start(self) -> None:
        self._inbox = self._client.nc.new_inbox()
        self._sub = await self._client.subscribe(self._inbox + ".*", self._on_message)
        self._client.on_reconnect.add(self._on_reconnect)
        ack_waits = self._transport._ack_waits
        shortest = min(
            (ack_waits.get(name, self._lease) for name in self._group_consumers()),
            default=self._lease,
        )
        if self._lease > shortest + _KEEP_MIN:
            self._keeper = asyncio.create_task(self._keep(shortest))

    def _group_consumers(self) -> list[str]:
        """The consumers this member may pull from."""
        return list(self._consumers)

    async def _keep(self, ack_wait: float) -> None:
        """Extend, with in-progress acks, what this member holds, up to its own lease: the
        group's consumers expire deliveries after the shortest lease any member asked for."""
        interval = max(_KEEP_MIN, ack_wait / 3)
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(interval)
            if not self._client.connected.is_set():
                continue
            until = loop.time() - self._lease + ack_wait
            held = [m for m, _, t in self._buffer if t > until]
            held += [m for m, t in self._unsettled.values() if t > until]
            try:
                await self._client.send([msg.reply for msg in held], _PROGRESS)
            except (ne.Error, OSError, TransportError) as exc:
                log.debug("extending leases in %s failed: %s", self.group, exc)

    # arrivals ----------------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        reply = msg.reply
        if reply:
            tokens = reply.split(".")
            consumer = self._consumers.get(tokens[3] if len(tokens) == 9 else tokens[5])
            if consumer is not None:
                request = consumer.request
                if request is not None:
                    request.delivered += 1
                    request.remaining -= 1
                    if request.remaining <= 0:
                        self._end(consumer)
            self._buffer.append((msg, tokens, self._clock()))
        else:
            # a status ending one of our requests: 404 no messages, 408 expired or drained,
            # 409/503 refused (then wait a little before asking that consumer again)
            consumer = self._by_inbox.get(msg.subject)
            if consumer is not None:
                headers = msg.headers or {}
                status = headers.get("Status", "")
                request = consumer.request
                if status == "100":
                    # an idle heartbeat: the request is alive on the consumer's leader
                    if request is not None:
                        request.lost_at = self._clock() + 3 * _HEARTBEAT
                    return
                if status not in ("404", "408") or (
                    "Pending" in headers.get("Description", "")  # 408 Requests Pending
                    and request is not None
                    and request.delivered == 0
                ):
                    consumer.not_before = asyncio.get_running_loop().time() + _BACKOFF
                    log.debug("pull from %s answered %s", consumer.name, headers)
                self._end(consumer)
        self._arrivals += 1
        self._arrived.set()

    def _end(self, consumer: _Consumer) -> None:
        if consumer.request is not None:
            self._by_inbox.pop(consumer.request.inbox, None)
            consumer.request = None

    def _on_reconnect(self) -> None:
        # pull requests died with the old connection (or the old server): forget them
        for consumer in self._consumers.values():
            self._end(consumer)
        self._arrivals += 1
        self._arrived.set()

    # pulling -----------------------------------------------------------------------------

    async def _pull(self, consumer: _Consumer, batch: int, expires: float | None) -> None:
        now = asyncio.get_running_loop().time()
        self._request_ids += 1
        inbox = f"{self._inbox}.{self._request_ids}"
        if expires is None:
            payload = b'{"batch":%d,"no_wait":true}' % batch
            lost_at = now + _PREFETCH_LOST
        elif expires >= _HEARTBEAT_FROM:
            payload = b'{"batch":%d,"no_wait":true,"expires":%d,"idle_heartbeat":%d}' % (
                batch,
                int(expires * 1e9),
                int(_HEARTBEAT * 1e9),
            )
            lost_at = now + 3 * _HEARTBEAT
        else:
            payload = b'{"batch":%d,"no_wait":true,"expires":%d}' % (batch, int(expires * 1e9))
            lost_at = now + expires + _LINGER_GRACE
        consumer.request = _Request(inbox, batch, lost_at)
        consumer.asked_at = now
        self._by_inbox[inbox] = consumer
        try:
            await self._client.nc.publish(consumer.next_request, payload, reply=inbox)
        except (ne.Error, OSError, TransportError) as exc:
            log.debug("pull request to %s not sent: %s", consumer.name, exc)
            self._end(consumer)
            consumer.not_before = now + _BACKOFF

    def _can_pull(self, consumer: _Consumer, now: float) -> bool:
        request = consumer.request
        if request is not None and now > request.lost_at:
            self._end(consumer)
            request = None
        return request is None and now >= consumer.not_before

    async def _linger(self, batch: int, remaining: float) -> None:
        if remaining < _MIN_EXPIRES or not self._client.connected.is_set():
            return
        now = asyncio.get_running_loop().time()
        for consumer in self._consumers.values():
            if self._can_pull(consumer, now):
                await self._pull(consumer, batch, remaining)

    async def _prefetch(self, batch: int) -> None:
        """Ask, without lingering, for what is already waiting: at once where the last delivery
        reported a backlog, and now and then elsewhere."""
        if len(self._buffer) >= batch or not self._client.connected.is_set():
            return
        now = asyncio.get_running_loop().time()
        for consumer in self._consumers.values():
            if self._can_pull(consumer, now) and (
                consumer.backlog > 0 or now - consumer.asked_at >= _IDLE_POLL
            ):
                await self._pull(consumer, batch, None)

    def _next_lost_at(self) -> float:
        return min(
            (c.request.lost_at for c in self._consumers.values() if c.request is not None),
            default=math.inf,
        )

    async def _wait(self, until: float, seen: int) -> None:
        if self._arrivals != seen or self._closed:
            return
        self._arrived.clear()
        timeout = until - asyncio.get_running_loop().time()
        if timeout <= 0:
            return
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation that
        # arrives as the event is set (see choreograph._cancel), and receive() then goes on
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._arrived.wait()

    # the contract ----------------------------------------------------------------------------

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        if self._closed:
            raise TransportError(f"NATS: the subscription of {self.group} is closed")
        want = max(1, max_messages)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            if self._closed:
                return []
            seen = self._arrivals
            now = loop.time()
            if self._buffer:
                # what has arrived goes at once (a request still delivering fills the buffer for
                # the next call): batches grow by themselves under load, never wait when idle
                out = self._hand_over(want)
                if self._malformed:
                    await self._bury_malformed()
                await self._prefetch(want)
                if not out:
                    continue  # all of them were malformed: wait on for good ones
                return out
            if now >= deadline:
                await self._prefetch(want)
                return []
            await self._linger(want, deadline - now)
            # wake up when an open request is presumed lost, to ask again (not at once while
            # a lost one cannot be replaced yet: disconnected, or backing off)
            wake = max(self._next_lost_at(), loop.time() + _BACKOFF)
            await self._wait(min(deadline, wake), seen)

    def _hand_over(self, count: int) -> list[Delivery]:
        out: list[Delivery] = []
        buffer = self._buffer
        names = self._transport._names
        unsettled = self._unsettled
        consumers = self._consumers
        for _ in range(min(count, len(buffer))):
            msg, tokens, arrived = buffer.popleft()
            v1 = len(tokens) == 9
            headers = msg.headers
            if headers is not None and len(headers) == 1 and ID_HEADER in headers:
                event_id = headers[ID_HEADER]  # the common case, short cut
            else:
                event_id = message_id(headers, f"nats:{tokens[5] if v1 else tokens[7]}")
            unsettled[msg.reply] = (msg, arrived)
            consumer = consumers.get(tokens[3] if v1 else tokens[5])
            if consumer is not None:
                consumer.backlog = int(tokens[8] if v1 else tokens[10])
            attempt = int(tokens[4] if v1 else tokens[6])
            try:
                topic, group = names.parse_subject(msg.subject)
            except ValueError as exc:
                # another client's subject (a bad escape...): never handed over, dead-lettered
                # by receive() with the reason, so it cannot fail every lease
                bad = Delivery(Message(event_id, "", msg.data), attempt, msg)
                self._malformed.append((bad, exc))
                continue
            out.append(Delivery(Message(event_id, topic, msg.data, group), attempt, msg))
        return out

    async def _bury_malformed(self) -> None:
        malformed, self._malformed = self._malformed, []
        for delivery, exc in malformed:
            msg: Msg = delivery.handle
            subject = msg.subject
            # the record's topic: what followed the group in the subject, as it is
            prefix = self._transport._names.group_prefix
            rest = subject[len(prefix) :] if subject.startswith(prefix) else subject
            message = Message(delivery.message.id, rest.partition(".")[2] or rest, msg.data)
            failure = Failure(
                InvalidMessage.reason,
                InvalidMessage.__name__,
                f"subject {subject[:300]!r} was not written by this transport: {exc}",
            )
            log.warning("dead-lettering a message of %s: %s", self.group, failure.error)
            try:
                await self.dead_letter(Delivery(message, delivery.attempt, msg), failure)
            except TransportError as bury_error:
                # it comes back when its lease runs out, and is tried again then
                self._unsettled.pop(msg.reply, None)
                log.warning("dead-lettering it failed: %s", bury_error)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        replies = [delivery.handle.reply for delivery in deliveries]
        for reply in replies:
            self._unsettled.pop(reply, None)
        settings = self._transport.settings
        doing = f"acknowledging in {self.group}"
        if settings.ack_flush:
            loop = asyncio.get_running_loop()
            await self._client.wait_connected(loop.time() + settings.publish_timeout, doing)
        with translated(doing):
            await self._client.send(replies, _ACK)
            if settings.ack_flush:
                # one round trip for the whole batch: the server has them when this returns
                await self._client.nc.flush(timeout=math.ceil(settings.request_timeout))

    async def retry(self, delivery: Delivery, delay: float) -> None:
        if delay > 0:
            margin = min(self._transport.settings.retry_margin, delay)
            nanos = int((delay + margin) * 1e9)
            payload = b'-NAK {"delay":%d}' % nanos
        else:
            payload = _NAK
        reply = delivery.handle.reply
        self._unsettled.pop(reply, None)
        # confirmed one by one (retries are rare): once this returns, the server holds the due
        # time, and no lease expiry can bring the message back before it
        await self._client.settle_confirmed(reply, payload, f"scheduling a retry in {self.group}")

    async def dead_letter(self, delivery: Delivery, failure: Failure) -> None:
        msg: Msg = delivery.handle
        tokens = msg.reply.split(".")
        stream_seq = tokens[5] if len(tokens) == 9 else tokens[7]
        # the same delivery dead-lettered twice (after a crash) is stored once
        key = f"dl/{self.group}/{stream_seq}/{delivery.attempt}"
        record = self._transport.dead_letter_record(
            delivery.message, self.group, failure, delivery.attempt, key
        )
        # stored in the dead letters first: a crash in between duplicates, never loses (and the
        # server drops the duplicate record within its duplicate window, by Nats-Msg-Id)
        await self._client.publish([record])
        self._unsettled.pop(msg.reply, None)
        await self._client.settle_confirmed(msg.reply, _TERM, f"dead-lettering in {self.group}")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._arrived.set()
        self._client.on_reconnect.discard(self._on_reconnect)
        self._transport._subscriptions.discard(self)
        sub, self._sub = self._sub, None
        if sub is not None:
            # stop the server delivering to us, and take in what was already on its way
            await self._client.unsubscribe(sub, drain=self._transport.settings.request_timeout)
        if self._keeper is not None:
            self._keeper.cancel()
        give_back = [held[0] for held in self._buffer] + [m for m, _ in self._unsettled.values()]
        self._buffer.clear()
        self._unsettled.clear()
        if not give_back or not self._client.is_open:
            return
        try:
            await self._give_back(give_back)
        except (ne.Error, OSError, TransportError) as exc:
            # they come back when their lease runs out
            log.debug("giving back %d deliveries of %s failed: %s", len(give_back), self.group, exc)

    async def _give_back(self, held: list[Msg]) -> None:
        """Nak what this member held, for any member to receive at once."""
        await self._client.send([msg.reply for msg in held], _NAK)
        if self._client.connected.is_set():
            await self._client.nc.flush(timeout=math.ceil(self._transport.settings.request_timeout))
