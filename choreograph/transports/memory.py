"""``memory://`` — an in-process bus for tests and experiments.

A real implementation of the transport contract, not a mock: groups, competing members, leases,
delayed retries, dead letters and replay behave as on every other transport. "Durable" here means
for the life of the transport object; nothing survives the process. Time comes from a
:class:`~choreograph.clock.Clock`, so a virtual clock moves retries and leases in tests.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Self

from choreograph.clock import SYSTEM_CLOCK, Clock
from choreograph.errors import PayloadTooLarge, TransportError
from choreograph.transport import (
    DeadLetter,
    Delivery,
    Failure,
    Message,
    Subscription,
    Transport,
    TransportSettings,
    check_group,
    oversized,
    split_oversized,
)


@dataclass(frozen=True)
class MemorySettings(TransportSettings):
    pass


@dataclass
class _Group:
    ready: deque[tuple[Message, int]] = field(default_factory=deque)
    delayed: list[tuple[float, int, Message, int]] = field(default_factory=list)
    leased: dict[int, tuple[Message, int, float]] = field(default_factory=dict)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryTransport(Transport):
    scheme = "memory"
    member_order = "group"
    gives_back_in_order = True

    def __init__(self, settings: MemorySettings | None = None, *, clock: Clock = SYSTEM_CLOCK):
        self.settings = settings or MemorySettings(url="memory://")
        self.clock = clock
        self._groups: dict[str, _Group] = {}
        self._topics: dict[str, set[str]] = {}
        self._dead: dict[str, DeadLetter] = {}
        self._ids = itertools.count(1)
        self._subscriptions: set[MemorySubscription] = set()
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(MemorySettings.from_url(url))

    async def connect(self) -> None:
        self._closed = False

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            await sub.close()
        self._closed = True

    async def declare_group(self, group: str, topics: Collection[str]) -> None:
        check_group(group)
        self._groups.setdefault(group, _Group())
        for topic in topics:
            self._topics.setdefault(topic, set()).add(group)

    async def publish(self, messages: Sequence[Message]) -> None:
        self._check_open()
        fits, over = split_oversized(messages, self.max_message_bytes)
        for message in over:
            reference, failure = oversized(message, self.max_message_bytes)
            for name in self._targets(message):
                self._groups.setdefault(name, _Group())
                self._add_dead(name, Delivery(reference, 0), failure)
        for message in fits:
            for name in self._targets(message):
                group = self._groups.setdefault(name, _Group())
                group.ready.append((message, 1))
                group.wakeup.set()

    def _targets(self, message: Message) -> list[str]:
        return [message.group] if message.group else sorted(self._topics.get(message.topic, ()))

    async def subscribe(
        self, group: str, topics: Collection[str], *, lease: float = 30.0
    ) -> MemorySubscription:
        self._check_open()
        await self.declare_group(group, topics)
        sub = MemorySubscription(self, group, frozenset(topics), lease)
        self._subscriptions.add(sub)
        return sub

    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        found = [d for d in self._dead.values() if group is None or d.group == group]
        return found[:limit]

    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        return self._dead.get(dead_letter_id)

    async def replay(self, dead_letter_id: str, body: bytes | None = None) -> bool:
        dead = self._dead.get(dead_letter_id)
        if dead is None:
            return False
        message = dead.message
        new_body = message.body if body is None else body
        if len(new_body) > self.max_message_bytes:
            raise PayloadTooLarge(
                f"replacement body is {len(new_body)} bytes; the limit is {self.max_message_bytes}"
            )
        await self.publish([Message(message.id, message.topic, new_body, group=dead.group)])
        del self._dead[dead_letter_id]
        return True

    async def discard(self, dead_letter_id: str) -> bool:
        return self._dead.pop(dead_letter_id, None) is not None

    async def lag(self, group: str) -> int | None:
        state = self._groups.get(group)
        return None if state is None else len(state.ready) + len(state.delayed)

    def busy(self, group: str) -> int:
        """Messages of ``group`` ready now, due now, or being handled (for test harnesses that
        wait until the system is quiet; pending retries that are not yet due do not count)."""
        state = self._groups.get(group)
        if state is None:
            return 0
        now = self.clock.now()
        due = sum(1 for item in state.delayed if item[0] <= now)
        return len(state.ready) + due + len(state.leased)

    # used by MemorySubscription -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("the memory transport is closed")

    def _group(self, name: str) -> _Group:
        return self._groups[name]

    def _next_id(self) -> int:
        return next(self._ids)

    def _add_dead(self, group: str, delivery: Delivery, failure: Failure) -> None:
        key = str(self._next_id())
        self._dead[key] = DeadLetter(
            key, group, delivery.message, failure, delivery.attempt, self.clock.now()
        )


class MemorySubscription(Subscription):
    def __init__(self, bus: MemoryTransport, group: str, topics: frozenset[str], lease: float):
        self._bus = bus
        self.group = group
        self.topics = topics
        self._lease = lease
        self._mine: set[int] = set()
        self._closed = False

    def _promote(self, state: _Group) -> float | None:
        """Move due retries and expired leases to ``ready``; return when the next one is due."""
        now = self._bus.clock.now()
        while state.delayed and state.delayed[0][0] <= now:
            _, _, message, attempt = heapq.heappop(state.delayed)
            state.ready.append((message, attempt))
        for token, (message, attempt, until) in list(state.leased.items()):
            if until <= now:
                del state.leased[token]
                state.ready.append((message, attempt + 1))
        deadlines = [d[0] for d in state.delayed[:1]] + [v[2] for v in state.leased.values()]
        return min(deadlines) - now if deadlines else None

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        if self._closed:
            raise TransportError("subscription is closed")
        state = self._bus._group(self.group)
        clock = self._bus.clock
        give_up = clock.now() + timeout
        while True:
            next_due = self._promote(state)
            if state.ready:
                break
            remaining = give_up - clock.now()
            if remaining <= 0 or self._closed:
                return []
            state.wakeup.clear()
            wait = remaining if next_due is None else min(remaining, next_due)
            sleeper = asyncio.ensure_future(clock.sleep(wait))
            woken = asyncio.ensure_future(state.wakeup.wait())
            try:
                await asyncio.wait({sleeper, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                woken.cancel()
        deliveries: list[Delivery] = []
        until = clock.now() + self._lease
        while state.ready and len(deliveries) < max_messages:
            message, attempt = state.ready.popleft()
            token = self._bus._next_id()
            state.leased[token] = (message, attempt, until)
            self._mine.add(token)
            deliveries.append(Delivery(message, attempt, token))
        return deliveries

    def _settle(self, delivery: Delivery) -> bool:
        """Take the delivery out of the leased set; False if its lease had already expired."""
        self._mine.discard(delivery.handle)
        return self._bus._group(self.group).leased.pop(delivery.handle, None) is not None

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            self._settle(delivery)

    async def retry(self, delivery: Delivery, delay: float) -> None:
        if self._settle(delivery):
            state = self._bus._group(self.group)
            due = self._bus.clock.now() + max(0.0, delay)
            heapq.heappush(
                state.delayed,
                (due, self._bus._next_id(), delivery.message, delivery.attempt + 1),
            )
            state.wakeup.set()

    async def dead_letter(self, delivery: Delivery, failure: Failure) -> None:
        if self._settle(delivery):
            self._bus._add_dead(self.group, delivery, failure)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        state = self._bus._group(self.group)
        for token in sorted(self._mine, reverse=True):  # in front, in the order received
            held = state.leased.pop(token, None)
            if held is not None:
                state.ready.appendleft((held[0], held[1]))
        self._mine.clear()
        state.wakeup.set()
        self._bus._subscriptions.discard(self)
