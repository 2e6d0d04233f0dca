"""What only the memory transport does, on a virtual clock: its settings, opening and closing,
``lag`` and ``busy``, leases and retries to the exact second, when an idle member wakes, and
settling what another member took over. (The conformance suite checks the shared contract.)"""

from __future__ import annotations

import asyncio

import pytest

from choreograph.clock import VirtualClock
from choreograph.errors import ConfigurationError, PayloadTooLarge, TransportError
from choreograph.transport import Failure, Message
from choreograph.transports.memory import MemorySettings, MemoryTransport

FAILURE = Failure("r", "E", "e")


def message(n: int = 0, *, topic: str = "t", group: str | None = None, size: int = 8) -> Message:
    return Message(f"m{n}", topic, b"x" * size, group)


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(start=1_000.0)


@pytest.fixture
def bus(clock: VirtualClock) -> MemoryTransport:
    return MemoryTransport(clock=clock)


class RecordingClock(VirtualClock):
    """A virtual clock that remembers every wait it was asked for."""

    def __init__(self) -> None:
        super().__init__(start=1_000.0)
        self.waits: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        await super().sleep(seconds)


async def until_asleep(clock: RecordingClock) -> None:
    """Let the event loop run until some task asked the clock for a wait."""
    for _ in range(1000):
        if clock.waits:
            return
        await asyncio.sleep(0)


# settings, open and closed ------------------------------------------------------------------------


def test_settings_default_and_from_the_url() -> None:
    assert MemoryTransport().settings == MemorySettings(url="memory://")
    assert MemoryTransport().settings.namespace == "choreograph"
    named = MemoryTransport.from_url("memory://?namespace=shop")
    assert named.settings == MemorySettings(url="memory://?namespace=shop", namespace="shop")
    with pytest.raises(ConfigurationError, match="unknown option 'bogus'"):
        MemoryTransport.from_url("memory://?bogus=1")


async def test_a_memory_bus_is_open_from_the_start(bus: MemoryTransport) -> None:
    # the bus lives in the process: connect() is needed only to reopen a closed one
    sub = await bus.subscribe("g", ["t"])
    await bus.publish([message()])
    assert [d.message.id for d in await sub.receive(1, 0)] == ["m0"]


async def test_closed_bus_refuses_publishing_until_connected_again(bus: MemoryTransport) -> None:
    # given a member, and the bus closed
    sub = await bus.subscribe("g", ["t"])
    await bus.close()

    # then publishing and subscribing fail, saying why; the member is closed too
    with pytest.raises(TransportError, match=r"^the memory transport is closed$"):
        await bus.publish([message()])
    with pytest.raises(TransportError, match=r"^the memory transport is closed$"):
        await bus.subscribe("g", ["t"])
    with pytest.raises(TransportError, match=r"^subscription is closed$"):
        await sub.receive(1, 0)

    # and once connected again it works
    await bus.connect()
    again = await bus.subscribe("g", ["t"])
    await bus.publish([message(1)])
    assert [d.message.id for d in await again.receive(1, 0)] == ["m1"]


async def test_a_closed_member_refuses_to_receive(bus: MemoryTransport) -> None:
    sub = await bus.subscribe("g", ["t", "u"])
    assert sub.topics == frozenset({"t", "u"})
    assert sub.group == "g"

    await sub.close()
    await sub.close()

    with pytest.raises(TransportError, match=r"^subscription is closed$"):
        await sub.receive(1, 0)


# lag and busy -------------------------------------------------------------------------------------


async def test_lag_counts_ready_and_retrying_messages_but_not_held_ones(
    bus: MemoryTransport,
) -> None:
    # given a group with four messages: one held, one retrying, two ready
    assert await bus.lag("g") is None
    sub = await bus.subscribe("g", ["t"])
    await bus.publish([message(n) for n in range(4)])
    _held, second = await sub.receive(2, 0)
    await sub.retry(second, 60)

    # then lag counts the two ready and the one retrying
    assert await bus.lag("g") == 3
    assert await bus.lag("other") is None


async def test_busy_counts_ready_due_and_held_messages_only(
    bus: MemoryTransport, clock: VirtualClock
) -> None:
    # given a group with one held message, one retry due in 10 s and two ready
    assert bus.busy("g") == 0
    sub = await bus.subscribe("g", ["t"])
    await bus.publish([message(n) for n in range(4)])
    held, retried = await sub.receive(2, 0)
    await sub.retry(retried, 10)

    # then busy counts the ready and held ones, not the retry until it is due
    assert bus.busy("g") == 3
    await clock.advance(9.5)
    assert bus.busy("g") == 3
    await clock.advance(0.5)  # due exactly now
    assert bus.busy("g") == 4
    await sub.ack([held])
    assert bus.busy("g") == 3
    assert bus.busy("unknown") == 0


# leases, retries and waking -----------------------------------------------------------------------


async def test_the_default_lease_is_30_seconds_to_the_second(
    bus: MemoryTransport, clock: VirtualClock
) -> None:
    # given member A holding a message under the default lease
    a = await bus.subscribe("g", ["t"])
    b = await bus.subscribe("g", ["t"])
    await bus.publish([message()])
    [held] = await a.receive(1, 0)

    # then B does not get it just before the lease ends, and gets it (attempt 2) when it ends
    await clock.advance(29.9)
    assert await b.receive(1, 0) == []
    await clock.advance(0.1)
    [again] = await b.receive(1, 0)
    assert (again.message.id, again.attempt) == (held.message.id, 2)


async def test_an_idle_member_sleeps_until_the_next_retry_is_due(bus: MemoryTransport) -> None:
    # given a member on a recording clock with a retry due in 5 s
    clock = RecordingClock()
    bus = MemoryTransport(clock=clock)
    sub = await bus.subscribe("g", ["t"], lease=300)
    await bus.publish([message()])
    [delivery] = await sub.receive(1, 0)
    await sub.retry(delivery, 5)

    # when it waits up to 60 s for messages
    waiting = asyncio.create_task(sub.receive(1, 60))
    await until_asleep(clock)

    # then it sleeps exactly until the retry is due, and gets it then
    assert clock.waits == [5.0]
    await clock.advance(5)
    [again] = await asyncio.wait_for(waiting, 30)
    assert again.attempt == 2


async def test_an_idle_member_sleeps_for_its_whole_timeout_when_nothing_is_due() -> None:
    clock = RecordingClock()
    bus = MemoryTransport(clock=clock)
    sub = await bus.subscribe("g", ["t"])

    waiting = asyncio.create_task(sub.receive(1, 7.5))
    await until_asleep(clock)
    assert clock.waits == [7.5]
    await clock.advance(7.5)

    assert await asyncio.wait_for(waiting, 30) == []


async def test_a_waiting_member_is_woken_by_a_publish_before_its_timeout(
    bus: MemoryTransport,
) -> None:
    # given a member waiting up to half a second (no virtual time passes)
    sub = await bus.subscribe("g", ["t"])
    waiting = asyncio.create_task(sub.receive(1, 0.5))
    await asyncio.sleep(0)

    # when a message is published, then the waiting member gets it
    await bus.publish([message()])
    got = await asyncio.wait_for(waiting, 30)
    assert [d.message.id for d in got] == ["m0"]


async def test_receive_with_no_timeout_returns_at_once(bus: MemoryTransport) -> None:
    sub = await bus.subscribe("g", ["t"])

    assert await asyncio.wait_for(sub.receive(1, 0), 30) == []


async def test_a_retry_comes_back_at_its_due_second_not_before(
    bus: MemoryTransport, clock: VirtualClock
) -> None:
    sub = await bus.subscribe("g", ["t"], lease=300)
    await bus.publish([message()])
    [delivery] = await sub.receive(1, 0)
    await sub.retry(delivery, 2)

    await clock.advance(1.99)
    assert await sub.receive(1, 0) == []
    await clock.advance(0.01)
    assert [d.attempt for d in await sub.receive(1, 0)] == [2]


# settling after the lease ran out ----------------------------------------------------------------


@pytest.mark.parametrize("settle", ["ack", "retry", "dead_letter", "close"])
async def test_a_late_settlement_leaves_the_new_holders_delivery_alone(
    bus: MemoryTransport, clock: VirtualClock, settle: str
) -> None:
    # given member A's lease ran out and member B took the message (attempt 2)
    a = await bus.subscribe("g", ["t"], lease=10)
    await bus.publish([message()])
    [late] = await a.receive(1, 0)
    await clock.advance(10)
    b = await bus.subscribe("g", ["t"], lease=10)
    [taken] = await b.receive(1, 0)
    assert taken.attempt == 2

    # when A settles its old delivery (or closes)
    if settle == "ack":
        await a.ack([late])
    elif settle == "retry":
        await a.retry(late, 0)
    elif settle == "dead_letter":
        await a.dead_letter(late, FAILURE)
    else:
        await a.close()

    # then nothing changed: B still holds it, nothing is dead, nothing came back
    assert bus.busy("g") == 1
    assert await bus.dead_letters() == []
    assert await b.receive(1, 0) == []
    await b.ack([taken])
    assert bus.busy("g") == 0


# dead letters ------------------------------------------------------------------------------------


async def test_dead_letters_list_100_by_default(bus: MemoryTransport) -> None:
    sub = await bus.subscribe("g", ["t"])
    await bus.publish([message(n) for n in range(101)])
    for delivery in await sub.receive(200, 0):
        await sub.dead_letter(delivery, FAILURE)

    assert len(await bus.dead_letters()) == 100
    assert len(await bus.dead_letters(limit=1000)) == 101


async def test_an_oversized_message_to_an_unknown_group_is_dead_lettered_there(
    bus: MemoryTransport,
) -> None:
    # given a small size limit
    bus.max_message_bytes = 100

    # when messages too big and small enough are addressed to groups nobody declared yet
    await bus.publish([message(1, group="late", size=101), message(2, group="early", size=10)])

    # then the big one is a dead letter of its group (never delivered: attempts 0), the small one
    # waits for the group's first member
    [dead] = await bus.dead_letters("late")
    assert (dead.message.id, dead.attempts) == ("m1", 0)
    assert "bytes" in dead.failure.error
    assert await bus.lag("late") == 0
    assert await bus.lag("early") == 1
    sub = await bus.subscribe("early", ["t"])
    assert [d.message.id for d in await sub.receive(1, 0)] == ["m2"]


async def test_a_replacement_body_over_the_limit_is_refused_and_the_letter_kept(
    bus: MemoryTransport,
) -> None:
    sub = await bus.subscribe("g", ["t"])
    await bus.publish([message()])
    [delivery] = await sub.receive(1, 0)
    await sub.dead_letter(delivery, FAILURE)
    [dead] = await bus.dead_letters()
    bus.max_message_bytes = 100

    with pytest.raises(PayloadTooLarge, match=r"^replacement body is 101 bytes; the limit is 100$"):
        await bus.replay(dead.id, b"y" * 101)

    assert [d.id for d in await bus.dead_letters()] == [dead.id]
