"""A member of a key-partitioned group (``partitioned=``): it pulls only the partitions it leases.

Publishers know nothing of a group's options, so nothing changes on the subjects they publish to
(``{ns}.ev.<topic>``, ``{ns}.grp.<group>.<topic>``): a partitioned group keeps its consumers of
those, and one member at a time, the group's *router*, moves what they deliver into the group's
partitions, ``{ns}.grp.<group>~<p>.<topic>`` with ``p`` the hash of the event's key
(:func:`~choreograph.envelope.partition_hash`) modulo the partitions. Each partition has one
durable consumer over all topics of the group (``<group>~~<p>``), pulled by the one member that
leases it. ``docs/ordering.md`` says what holds; in short:

* a lease is a message in the group's leases stream (``{ns}_parts_<group>``, one message kept
  per subject), which the server removes ``max_age`` after its last renewal: 1.5 times the
  group's ack_wait, so a dead member's deliveries are due again before its partitions move;
  taking a lease is a publish expecting the subject empty, renewing it one expecting the
  member's own last message (compare-and-set on the server);
* every member renews its presence (``m.<member>``) and its leases each round, and takes free
  partitions up to its fair share, ``ceil(partitions / live members)``;
* above it (a member joined), it stops pulling its surplus partitions, and lets each go once it
  holds nothing of it (handed over and settled); a member that closes gives back what it holds
  (naks, confirmed) and lets everything go at once; one that dies keeps its leases until they
  run out;
* JetStream delivers a consumer's due redeliveries before new messages, so the next holder
  receives what the previous one left unsettled first, in its place;
* the router is a lease too (``router``): a crashed router's unrouted messages are due again
  before the next router starts, and the ones it had routed but not acknowledged are routed again
  under the same ``Nats-Msg-Id`` (``p/<group>/<stream sequence>``), which the server drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
import zlib
from typing import TYPE_CHECKING

from nats.aio.msg import Msg

from choreograph.envelope import partition_hash
from choreograph.errors import ChoreographError, TransportError
from choreograph.transport import oversized
from choreograph.transports.nats._client import Outgoing
from choreograph.transports.nats._errors import translated
from choreograph.transports.nats._names import ENCODED_ID_HEADER, ID_HEADER
from choreograph.transports.nats._subscription import _NAK, NatsSubscription, _Consumer

if TYPE_CHECKING:
    from choreograph.transports.nats._transport import NatsTransport

log = logging.getLogger("choreograph.transports.nats")

_MAX_ROUND = 1.0
"""Seconds between a member's rounds at most (renewals, shares); a sixth of the lease if less."""
_MIN_ROUND = 0.05
_WRONG_LAST_SEQUENCE = 10071
_ROUTER = "router"
_ROUTE_BATCH = 500


def _consumer_of(reply: str) -> str:
    tokens = reply.split(".")
    return tokens[3] if len(tokens) == 9 else tokens[5]


def _stream_sequence(reply: str) -> str:
    tokens = reply.split(".")
    return tokens[5] if len(tokens) == 9 else tokens[7]


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` until it is done: a cancellation can be lost inside nats-py (its requests
    wait with ``asyncio.wait_for``, which on Python 3.11 may swallow one that arrives as the
    answer does), and the task's loop would then go on."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.result()


class _Leases:
    """One member's leases in its group's leases stream, by key (``p.<n>``, ``router``,
    ``m.<member>``), with the stream sequence of the member's last message for each."""

    def __init__(self, transport: NatsTransport, group: str, member: str) -> None:
        self._client = transport._client
        names = transport._names
        self.stream = names.leases_stream(group)
        self._prefix = names.lease_subject(group, "")
        self._member = member.encode()
        self._timeout = transport.settings.request_timeout
        self.mine: dict[str, int] = {}

    async def present(self) -> tuple[set[str], float]:
        """The keys leased now (by anyone), and the leases' lifetime in seconds."""
        info = await self._client.api(
            f"STREAM.INFO.{self.stream}", {"subjects_filter": self._prefix + ">"}
        )
        subjects = (info.get("state") or {}).get("subjects") or {}
        ttl = int((info.get("config") or {}).get("max_age", 0)) / 1e9
        return {s[len(self._prefix) :] for s in subjects}, ttl

    async def put(self, key: str, expected: int | None) -> bool:
        """Store this member's lease of ``key``: replacing its own last message (``expected`` its
        sequence), only where none is (``expected`` 0), or anyway (None). False: another
        member's lease is there, or this member's ran out."""
        headers = {} if expected is None else {"Nats-Expected-Last-Subject-Sequence": str(expected)}
        with translated(f"renewing the lease {key} of {self.stream}"):
            reply = await self._client.nc.request(
                self._prefix + key, self._member, timeout=self._timeout, headers=headers or None
            )
        answer = json.loads(reply.data or b"{}")
        error = answer.get("error")
        if error is not None:
            if error.get("err_code") == _WRONG_LAST_SEQUENCE:
                self.mine.pop(key, None)
                return False
            raise TransportError(f"NATS: storing the lease {key} of {self.stream}: {error}")
        self.mine[key] = int(answer["seq"])
        return True

    async def renew(self, key: str) -> bool:
        return await self.put(key, self.mine.get(key, 0))

    async def drop(self, key: str) -> None:
        """Let ``key`` go: delete this member's message (gone already if the lease ran out)."""
        seq = self.mine.pop(key, None)
        if seq is None:
            return
        # one attempt: if it fails (the lease ran out meanwhile, the server is away or does not
        # answer: seen once on 2.9.10 under load, for every retry of one delete), the lease
        # runs out by itself and the partition moves then
        with contextlib.suppress(Exception):
            await self._client.api(f"STREAM.MSG.DELETE.{self.stream}", {"seq": seq}, retry=False)


async def _give_back_in_order(sub: NatsSubscription, held: list[Msg]) -> None:
    """Nak what a member held, oldest first; the last of each consumer with a confirmation, which
    the server sends once it processed it (and the ones before it, in order). The member lets its
    leases go after this, and the next holder receives these first, in their place: the server
    redelivers naked messages in the order they were naked."""
    held = sorted(held, key=lambda m: int(_stream_sequence(m.reply)))
    last: dict[str, Msg] = {_consumer_of(m.reply): m for m in held}
    rest = [m.reply for m in held if last[_consumer_of(m.reply)] is not m]
    if rest:
        await sub._client.send(rest, _NAK)
    for msg in last.values():
        await sub._client.settle_confirmed(msg.reply, _NAK, f"giving back in {sub.group}")


class _Inputs(NatsSubscription):
    """What the router pulls: the group's consumers publishers reach."""

    async def _give_back(self, held: list[Msg]) -> None:
        await _give_back_in_order(self, held)


class _Router:
    """Moves the group's messages from the consumers publishers reach into its partitions, in
    the order each consumer delivers them, then acknowledges them."""

    def __init__(
        self, transport: NatsTransport, member: PartitionedSubscription, inputs: list[str]
    ) -> None:
        self._transport = transport
        self._names = transport._names
        self._group = member.group
        self._partitions = member.partition_count
        self._sub = _Inputs(transport, member.group, member.topics, inputs, member.lease)
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        await self._sub.start()
        self._task = asyncio.create_task(self._run(), name=f"route-{self._group}")

    async def _run(self) -> None:
        while not self._closing:
            try:
                got = await self._sub.receive(_ROUTE_BATCH, _MAX_ROUND)
                if not got:
                    continue
                # in stream order: each topic's messages are in it already, and topics pulled
                # side by side are put back in publish order as far as this batch goes
                got.sort(key=lambda d: int(_stream_sequence(d.handle.reply)))
                limit = self._transport.max_message_bytes
                for delivery in [d for d in got if len(d.message.body) > limit]:
                    # too big to route with its headers (another client's): dead-lettered by
                    # reference, as a publish of it would have been
                    got.remove(delivery)
                    await self._sub.dead_letter(delivery, oversized(delivery.message, limit)[1])
                outgoing = [self._routed(d.message.id, d.message.topic, d.handle) for d in got]
                await self._transport._client.publish(outgoing)
                await self._sub.ack(got)
            except ChoreographError as exc:
                # what was not acknowledged is routed again after its lease (deduplicated)
                log.warning("routing the messages of %s failed: %s", self._group, exc)
                await asyncio.sleep(_MAX_ROUND)
            except Exception:
                # never a router that holds its lease and routes nothing
                log.exception("routing the messages of %s failed", self._group)
                await asyncio.sleep(_MAX_ROUND)

    def _routed(self, event_id: str, topic: str, msg: Msg) -> Outgoing:
        partition = partition_hash(msg.data, event_id) % self._partitions
        subject = self._names.partition_subject(self._group, partition, topic)
        headers = {
            # the same message routed twice (a router crashed in between) is stored once
            ID_HEADER: f"p/{self._group}/{_stream_sequence(msg.reply)}",
            ENCODED_ID_HEADER: json.dumps(event_id),
        }
        return subject, msg.data, headers

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            await _stop(task)
        await self._sub.close()


class PartitionedSubscription(NatsSubscription):
    """One member of a partitioned group (see the module docstring)."""

    def __init__(
        self,
        transport: NatsTransport,
        group: str,
        topics: frozenset[str],
        inputs: list[str],
        lease: float,
        partitions: int,
    ) -> None:
        super().__init__(transport, group, topics, [], lease)
        self.lease = lease
        self.partition_count = partitions
        self._inputs = inputs
        self._member = uuid.uuid4().hex[:16]
        self._leases = _Leases(transport, group, self._member)
        self._draining: set[str] = set()
        self._router: _Router | None = None
        self._round = _MAX_ROUND
        self._balancer: asyncio.Task[None] | None = None
        self._closing = False
        # members start looking for free partitions at different ones, so they rarely race
        self._first = zlib.crc32(self._member.encode()) % partitions

    @property
    def partitions(self) -> list[int]:
        """The partitions this member pulls now (for tests and the console)."""
        return sorted(
            int(name.rpartition("~")[2]) for name in self._consumers if name not in self._draining
        )

    @property
    def routes(self) -> bool:
        """Whether this member is the group's router now."""
        return self._router is not None

    def _group_consumers(self) -> list[str]:
        names = self._transport._names
        return [names.partition_consumer(self.group, p) for p in range(self.partition_count)]

    async def start(self) -> None:
        await super().start()
        await self._balance()
        self._balancer = asyncio.create_task(self._balance_loop(), name=f"balance-{self.group}")

    async def _balance_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._round)
            try:
                await self._balance()
            except ChoreographError as exc:  # the server away: the next round tries again
                log.warning("balancing the partitions of %s failed: %s", self.group, exc)
            except Exception:  # never a member pulling partitions whose leases it stopped renewing
                log.exception("balancing the partitions of %s failed", self.group)

    async def _balance(self) -> None:
        leases = self._leases
        present, ttl = await leases.present()
        self._round = max(_MIN_ROUND, min(_MAX_ROUND, ttl / 6))
        await leases.put(f"m.{self._member}", None)
        for key in [k for k in leases.mine if not k.startswith("m.")]:
            if not await leases.renew(key):
                await self._lost(key)
        members = {k for k in present if k.startswith("m.")} | {f"m.{self._member}"}
        share = math.ceil(self.partition_count / len(members))
        reading = [n for n in self._consumers if n not in self._draining]
        for name in reading[share:]:  # above the share: stop pulling, let go once settled
            self._draining.add(name)
        for name in sorted(self._draining)[: max(0, share - len(reading))]:
            self._draining.discard(name)  # a member left: keep it after all
        for name in list(self._draining):
            if not self._holds(name):
                await self._let_go(name)
        await self._take(present, share)
        if self._router is None and _ROUTER not in present and await leases.put(_ROUTER, 0):
            self._router = _Router(self._transport, self, self._inputs)
            await self._router.start()

    async def _take(self, present: set[str], share: int) -> None:
        names = self._transport._names
        count = self.partition_count
        for i in range(count):
            if len(self._consumers) - len(self._draining) >= share:
                return
            p = (self._first + i) % count
            name = names.partition_consumer(self.group, p)
            if f"p.{p}" in present or name in self._consumers:
                continue
            if await self._leases.put(f"p.{p}", 0):
                self._consumers[name] = _Consumer(name, names.next_request(name))
                self._arrivals += 1
                self._arrived.set()  # a receive waiting with nothing to pull asks it now

    def _holds(self, name: str) -> bool:
        consumer = self._consumers.get(name)
        if consumer is not None and consumer.request is not None:
            return True
        return any(_consumer_of(m.reply) == name for m, _, _ in self._buffer) or any(
            _consumer_of(m.reply) == name for m, _ in self._unsettled.values()
        )

    async def _let_go(self, name: str) -> None:
        self._draining.discard(name)
        consumer = self._consumers.pop(name, None)
        if consumer is not None:
            self._end(consumer)
        await self._leases.drop(f"p.{name.rpartition('~')[2]}")

    async def _lost(self, key: str) -> None:
        """A lease that ran out while this member lived (it stalled longer than the lease):
        another member may have it now, so stop at once."""
        log.warning("the lease %s of %s ran out before it was renewed", key, self.group)
        if key == _ROUTER:
            router, self._router = self._router, None
            if router is not None:
                await router.close()
            return
        name = self._transport._names.partition_consumer(self.group, int(key[2:]))
        self._draining.discard(name)
        consumer = self._consumers.pop(name, None)
        if consumer is not None:
            self._end(consumer)

    def _can_pull(self, consumer: _Consumer, now: float) -> bool:
        return super()._can_pull(consumer, now) and consumer.name not in self._draining

    async def _give_back(self, held: list[Msg]) -> None:
        await _give_back_in_order(self, held)

    async def close(self) -> None:
        if self._closed or self._closing:
            return
        self._closing = True
        balancer, self._balancer = self._balancer, None
        if balancer is not None:
            await _stop(balancer)
        router, self._router = self._router, None
        if router is not None:
            await router.close()
        await super().close()
        if self._client.is_open:
            await asyncio.gather(*(self._leases.drop(key) for key in list(self._leases.mine)))
