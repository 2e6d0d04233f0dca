"""Waiting helpers of the key-partitioned transport tests (Redis and NATS): poll for what a test
then checks; the time only guards against a hang."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

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
