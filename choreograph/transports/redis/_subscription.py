"""A member of a group: a consumer in the group's consumer group, reading and settling."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from choreograph.errors import ChoreographError, TransportError
from choreograph.transport import Delivery, Failure, Subscription
from choreograph.transports.redis._records import decode_entry, decode_frames

if TYPE_CHECKING:
    from choreograph.transports.redis._transport import RedisTransport

log = logging.getLogger("choreograph.transports.redis")

_READ_BUDGET_BYTES = 8 * 1024 * 1024
"""A read stops taking entries once it holds about this many body bytes."""
_REAP_IDLE_MS = 600_000
"""A consumer holding nothing and silent for this long is a member that is gone: forget it."""
_ACK_CHUNK = 4000
_CLAIM_LIMIT = 1000
"""Both stay well under what one Lua ``unpack`` can spread into a command's arguments."""


class RedisSubscription(Subscription):
    """One member: a consumer named ``<host>-<pid>-<random>~<lease ms>`` in the group."""

    def __init__(
        self, bus: RedisTransport, group: str, topics: frozenset[str], lease: float
    ) -> None:
        self._bus = bus
        self.group = group
        self.topics = topics
        self._lease_ms = max(1, math.ceil(lease * 1000))
        self._consumer = (
            f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}~{self._lease_ms}"
        )
        self._stream = bus._stream(group)
        self._held: dict[bytes, Delivery] = {}
        self._closed = False
        self._interval = min(bus.settings.housekeeping_interval, max(0.01, lease / 4))
        self._next_housekeeping = 0.0
        self._next_due: float | None = None
        self._max_block = bus.settings.socket_timeout / 2

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        if self._closed:
            raise TransportError("subscription is closed")
        if max_messages <= 0:
            return []
        give_up = time.monotonic() + max(0.0, timeout)
        while True:
            got: list[Delivery] = []
            now = time.monotonic()
            if now >= self._next_housekeeping or (
                self._next_due is not None and now >= self._next_due
            ):
                got = await self._housekeep(max_messages)
            if len(got) < max_messages:
                got += await self._read(max_messages - len(got))
            if not got:
                now = time.monotonic()
                wait = min(give_up, self._next_housekeeping) - now
                if self._next_due is not None:
                    wait = min(wait, self._next_due - now)
                wait = min(wait, self._max_block)
                if wait > 0:
                    got = await self._read_blocking(wait)
                    if got and max_messages > 1:
                        got += await self._read(max_messages - 1)
            if got:
                return await self._hand_out(got)
            if time.monotonic() >= give_up or self._closed:
                return []

    async def _hand_out(self, got: list[Delivery]) -> list[Delivery]:
        if self._closed:  # closed while this read was in flight: give them back
            await self._give_back(got)
            return []
        held = self._held
        for delivery in got:
            held[delivery.handle] = delivery
        return got

    async def _read(self, count: int) -> list[Delivery]:
        blob = await self._bus._script(
            "read",
            [self._stream],
            [self.group, self._consumer, count, _READ_BUDGET_BYTES],
            "receive",
        )
        return decode_frames(blob) if blob else []

    async def _read_blocking(self, wait: float) -> list[Delivery]:
        client = self._bus._redis()
        block_ms = max(1, math.ceil(wait * 1000))
        reply: Any = await self._bus._call(
            lambda: client.xreadgroup(
                self.group, self._consumer, {self._stream: ">"}, count=1, block=block_ms
            ),
            "receive",
        )
        if not reply:
            return []
        return [decode_entry(eid, entry) for eid, entry in reply[0][1] if entry]

    async def _housekeep(self, want: int) -> list[Delivery]:
        bus = self._bus
        claim = min(want, _CLAIM_LIMIT)
        wait_us, blob = await bus._script(
            "housekeep",
            [self._stream, bus._delayed_key, bus._delayed_counts_key],
            [bus._prefix, self.group, self._consumer, self._lease_ms, claim, _REAP_IDLE_MS],
            "receive",
        )
        now = time.monotonic()
        wait = int(wait_us)
        self._next_due = None if wait < 0 else now + wait / 1e6
        claimed = decode_frames(blob) if blob else []
        # More may be waiting when the pass was full: go again at once.
        self._next_housekeeping = now if len(claimed) >= claim else now + self._interval
        return claimed

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        handles = [d.handle for d in deliveries]
        for start in range(0, len(handles), _ACK_CHUNK):
            chunk = handles[start : start + _ACK_CHUNK]
            await self._bus._script("ack", [self._stream], [self.group, *chunk], "ack")
        held = self._held
        for handle in handles:
            held.pop(handle, None)

    def _place(self, delivery: Delivery) -> tuple[str, bytes, list[str]]:
        """Where ``delivery`` is: its stream, its entry id there, and what the settling scripts
        need besides (a partitioned group adds its partition)."""
        return self._stream, delivery.handle, []

    async def retry(self, delivery: Delivery, delay: float) -> None:
        bus = self._bus
        stream, entry, extra = self._place(delivery)
        delay_us = max(0, math.ceil(delay * 1_000_000))
        await bus._script(
            "retry",
            [stream, bus._delayed_key, bus._delayed_counts_key],
            [self.group, self._consumer, entry, delivery.attempt + 1, delay_us, *extra],
            "retry",
        )
        self._held.pop(delivery.handle, None)
        if delay_us:
            due = time.monotonic() + delay_us / 1e6
            self._next_due = due if self._next_due is None else min(self._next_due, due)
        await bus._wait_replicas("retry")

    async def dead_letter(self, delivery: Delivery, failure: Failure) -> None:
        bus = self._bus
        stream, entry, extra = self._place(delivery)
        args = [self.group, self._consumer, entry, delivery.attempt]
        args += [failure.reason, failure.error_type, failure.error, repr(time.time())]
        args += [failure.traceback, *extra]
        await bus._script("dead_letter", [stream, bus._dlq(self.group)], args, "dead_letter")
        self._held.pop(delivery.handle, None)
        await bus._wait_replicas("dead_letter")

    async def _give_back(self, deliveries: Collection[Delivery]) -> None:
        """Put unsettled deliveries back at the end of the stream, attempt unchanged, and leave
        the consumer group. If Redis cannot be reached, their lease brings them back instead."""
        args: list[Any] = [self.group, self._consumer]
        for d in deliveries:
            args += (d.handle, d.attempt)
        try:
            await self._bus._script("release", [self._stream], args, "close", retry=False)
        except ChoreographError as exc:
            log.warning("redis: could not give back %d deliveries: %s", len(deliveries), exc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bus._subscriptions.discard(self)
        held, self._held = self._held, {}
        if self._bus._client is not None:
            await self._give_back(held.values())
