"""Waiting helpers of the key-partitioned transport tests (Redis and NATS): poll for what a test
then checks; the time only guards against a hang."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Protocol

from choreograph.transport import Delivery, Subscription

HANG_GUARD = 60.0


async def until(check: Callable[[], Awaitable[object]], within: float = HANG_GUARD) -> None:
    """Poll ``check`` until it is truthy."""
    give_up = time.monotonic() + within
    while not await check():
        assert time.monotonic() < give_up, "not within the hang guard"


async def receive(sub: Subscription, count: int) -> list[Delivery]:
    """``count`` deliveries of ``sub``, received in as many calls as it takes."""
    got: list[Delivery] = []
    give_up = time.monotonic() + HANG_GUARD
    while len(got) < count:
        assert time.monotonic() < give_up, f"only {len(got)} of {count} received"
        got += await sub.receive(count - len(got), 0.2)
    return got


class PartitionMember(Protocol):
    """A member of a key-partitioned group (Redis's or NATS's subscription)."""

    @property
    def partitions(self) -> Collection[int]: ...

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]: ...


async def shared_out(members: Sequence[PartitionMember], sizes: list[int]) -> bool:
    """Whether ``members`` hold partitions of these sizes (in any order), none held twice;
    each receives once first, as a member does meanwhile."""
    for member in members:
        await member.receive(1, 0.05)
    owned = [p for member in members for p in member.partitions]
    held = sorted(len(member.partitions) for member in members)
    return held == sizes and len(set(owned)) == len(owned)
