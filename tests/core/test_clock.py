"""Clock, SystemClock and VirtualClock: the runtime's only source of time."""

from __future__ import annotations

import asyncio
import time

from choreograph import Clock, SystemClock, VirtualClock
from choreograph.clock import SYSTEM_CLOCK
from choreograph.transports.memory import MemoryTransport
from tests.conformance._helpers import message, unique


async def test_system_clock_reads_the_wall_clock() -> None:
    # given the system clock
    clock: Clock = SystemClock()

    # when it is read between two readings of time.time()
    before = time.time()
    now = clock.now()
    after = time.time()

    # then it lies between them
    assert before <= now <= after
    assert isinstance(SYSTEM_CLOCK, SystemClock)


async def test_system_clock_sleeps_at_least_the_time_asked() -> None:
    clock = SystemClock()

    started = time.monotonic()
    await clock.sleep(0.05)

    assert time.monotonic() - started >= 0.05


async def test_system_clock_sleep_of_a_negative_time_returns() -> None:
    # a past deadline computes a negative wait: it must not raise
    await asyncio.wait_for(SystemClock().sleep(-5.0), timeout=30)


async def test_virtual_clock_stands_still_until_advanced() -> None:
    clock = VirtualClock(start=100.0)

    assert clock.now() == 100.0
    await asyncio.sleep(0.01)
    assert clock.now() == 100.0

    await clock.advance(2.5)
    assert clock.now() == 102.5


async def test_virtual_clock_wakes_sleepers_in_due_order_and_only_when_due() -> None:
    # given three sleepers of a virtual clock, due after 3, 1 and 2 seconds
    clock = VirtualClock(start=0.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in [("c", 3), ("a", 1), ("b", 2)]]
    await asyncio.sleep(0)

    # when time moves 1.5 s, then only the first is woken, at its own due time
    await clock.advance(1.5)
    assert woke == [("a", 1.0)]

    # when time moves on past the others, then they wake in order, each at its due time
    await clock.advance(10)
    assert woke == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert clock.now() == 11.5
    await asyncio.gather(*tasks)


async def test_virtual_clock_sleep_of_zero_returns_without_advancing() -> None:
    clock = VirtualClock(start=5.0)

    await asyncio.wait_for(clock.sleep(0), timeout=30)

    assert clock.now() == 5.0


async def test_a_transport_on_a_virtual_clock_delays_retries_in_virtual_time() -> None:
    # given a memory transport on a virtual clock, and a message retried after an hour
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    await bus.connect()
    topic = unique("topic")
    sub = await bus.subscribe(unique("g"), [topic])
    await bus.publish([message(topic)])
    [delivery] = await sub.receive(1, 0)
    await sub.retry(delivery, 3600)

    # then it is not there before the hour has passed on that clock
    await clock.advance(3599)
    assert await sub.receive(1, 0) == []

    # and it is there, as attempt 2, once it has
    await clock.advance(1)
    [again] = await sub.receive(1, 0)
    assert again.attempt == 2
    await bus.close()
