"""Ordering across the members of a group, where a transport claims it
(:meth:`Transport.orders_across_members`): Redis and NATS with ``partitioned=`` (key-partitioned
consumption), RabbitMQ with ``single_active=`` (one active consumer). Members join and leave while
the keys' events flow, one is killed with SIGKILL: one key's events are with one member at a time,
and each key's events are received and handled in publish order. Where partitioned, the
partitions are also spread over the live members. The others claim nothing and are skipped."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from choreograph import App, Context, Runtime, Service, WorkerSettings
from choreograph.envelope import decode
from choreograph.transport import Delivery, Message, Subscription, Transport, transport_from_url
from tests.conformance._helpers import unique
from tests.conformance.test_ordering import Step, by_key, interleaved, wait_for

HANG_GUARD = 120.0
#: The URL option that makes a group ordered across its members, per transport that has one.
OPTIONS = {
    "redis": "partitioned={group}&partitions=8",
    "nats": "partitioned={group}&partitions=8",
    "amqp": "single_active={group}",
}
#: Transports that spread a group's work over its members (RabbitMQ's is active/standby).
SPREADS = {"redis", "nats"}

BusFor = Callable[[str], Awaitable[Transport]]


@pytest.fixture
async def bus_for(transport_name: str, transport_url: str) -> AsyncIterator[BusFor]:
    """New connections to the test's bus, with ``group`` ordered across its members."""
    if transport_name not in OPTIONS:
        assert not transport_from_url(transport_url).orders_across_members("g")
        pytest.skip(f"{transport_name}:// does not order a group across its members")
    opened: list[Transport] = []
    groups: set[str] = set()

    def url_for(group: str) -> str:
        return f"{transport_url}&{OPTIONS[transport_name].format(group=group)}"

    async def make(group: str) -> Transport:
        groups.add(group)
        bus = transport_from_url(url_for(group))
        await bus.connect()
        assert bus.orders_across_members(group)
        assert not bus.orders_across_members(f"{group}_other")
        opened.append(bus)
        return bus

    yield make
    for bus in reversed(opened):
        await bus.close()
    # Delete from a fresh connection per group, naming it: runtimes of the test declared groups
    # through connections of their own, and AMQP cannot list queues (a quorum queue left behind
    # holds file handles on the shared broker).
    for group in groups:
        async with transport_from_url(url_for(group)) as fresh:
            await fresh.declare_group(group, ())
            await fresh.delete_namespace()


def key_of(delivery: Delivery) -> tuple[str, int]:
    data = decode(delivery.message.body).data
    return data["order_id"], data["n"]


class Members:
    """Members of one group, each receiving and acknowledging in a task of its own, a little
    slowly, and checking that no other member holds an event of a key it receives."""

    def __init__(self, make: BusFor, group: str, topic: str) -> None:
        self.make, self.group, self.topic = make, group, topic
        self.handled: list[tuple[str, int]] = []
        self.by_member: dict[str, int] = {}
        self.holder: dict[str, tuple[str, int]] = {}  # key -> (member, events it holds)
        self.overlaps: list[str] = []
        self.subs: dict[str, Subscription] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stopping: set[str] = set()
        self.rng = random.Random(11)

    async def join(self, name: str, lease: float = 30.0) -> Subscription:
        bus = await self.make(self.group)
        sub = await bus.subscribe(self.group, [self.topic], lease=lease)
        self.subs[name] = sub
        self.by_member[name] = 0
        self.tasks[name] = asyncio.create_task(self._work(name, sub))
        return sub

    async def _work(self, name: str, sub: Subscription) -> None:
        while True:
            got = await sub.receive(5, 0.2)
            for delivery in got:
                key, _ = key_of(delivery)
                member, count = self.holder.get(key, (name, 0))
                if member != name:
                    self.overlaps.append(f"{key}: {name} received while {member} held")
                self.holder[key] = (name, count + 1)
            if name in self.stopping:  # leaves holding this batch, unsettled
                for delivery in got:
                    self._release(key_of(delivery)[0])
                return
            for delivery in got:
                await asyncio.sleep(self.rng.uniform(0, 0.003))
                self.handled.append(key_of(delivery))
                self.by_member[name] += 1
                await sub.ack([delivery])
                self._release(key_of(delivery)[0])

    def _release(self, key: str) -> None:
        member, count = self.holder[key]
        if count <= 1:
            del self.holder[key]
        else:
            self.holder[key] = (member, count - 1)

    async def leave(self, name: str) -> None:
        """The member stops after receiving its next batch, without settling it, and closes."""
        self.stopping.add(name)
        await self.tasks[name]
        await self.subs[name].close()

    async def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def publish(bus: Transport, sent: list[Message]) -> None:
    for start in range(0, len(sent), 6):
        await bus.publish(sent[start : start + 6])


async def test_each_key_is_with_one_member_at_a_time_in_order_as_members_join_and_leave(
    bus_for: BusFor, transport_name: str
) -> None:
    # given a group ordered across its members, two members, and twelve keys' events interleaved
    group, topic = unique("g"), unique("Step")
    bus = await bus_for(group)
    await bus.declare_group(group, [topic])
    keys = [f"k{i}" for i in range(12)]
    sent = [Message(m.id, topic, m.body) for m in interleaved(keys, 30)]
    thirds = [sent[:120], sent[120:240], sent[240:]]
    members = Members(bus_for, group, topic)
    try:
        await members.join("a")
        await members.join("b")
        await publish(bus, thirds[0])
        await wait_for(lambda: len(members.handled) >= 60, HANG_GUARD)

        # when a third member joins, then the first leaves holding a batch it never settles
        c = await members.join("c")
        if transport_name in SPREADS:  # c gets its share once the others let partitions go
            await wait_for(lambda: getattr(c, "partitions", None), HANG_GUARD)
        await publish(bus, thirds[1])
        await wait_for(lambda: len(members.handled) >= 200, HANG_GUARD)
        await members.leave("a")
        await publish(bus, thirds[2])
        await wait_for(lambda: len(members.handled) >= len(sent), HANG_GUARD)
    finally:
        await members.stop()

    # then no two members held one key's events at once, and each key's went in publish order,
    # each handled once (the left member's unsettled batch went to the next holder in its place)
    assert members.overlaps == []
    assert by_key(members.handled) == {key: list(range(30)) for key in keys}
    if transport_name in SPREADS:  # and every member did part of the work
        assert all(members.by_member.values()), members.by_member
    else:  # one active member at a time
        assert members.by_member["a"] > 0


async def test_a_killed_members_keys_move_after_its_lease_in_order(
    bus_for: BusFor, transport_name: str, transport_url: str
) -> None:
    # given a member in its own process holding 5 events unsettled
    group, topic = unique("g"), unique("Step")
    bus = await bus_for(group)
    await bus.declare_group(group, [topic])
    keys = [f"k{i}" for i in range(4)]
    sent = [Message(m.id, topic, m.body) for m in interleaved(keys, 10)]
    await publish(bus, sent[:20])
    url = f"{transport_url}&{OPTIONS[transport_name].format(group=group)}"
    member = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.conformance._member", url, group, topic, "2", "5",
        stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert member.stdout is not None
    try:
        async with asyncio.timeout(HANG_GUARD):
            while (await member.stdout.readline()).strip() != b"holding":
                pass
        # when a second member joins, more events are published, and the first is killed
        survivor = await (await bus_for(group)).subscribe(group, [topic], lease=2)
        await publish(bus, sent[20:])
    finally:
        os.kill(member.pid, signal.SIGKILL)
        await member.wait()

    # then the survivor receives every event once its lease ran out, each key in publish order,
    # the killed member's held ones as redeliveries
    got: list[Delivery] = []
    async with asyncio.timeout(HANG_GUARD):
        while len({d.message.id for d in got}) < len(sent):
            batch = await survivor.receive(10, 0.5)
            await survivor.ack(batch)
            got += batch
    assert by_key([key_of(d) for d in got]) == {key: list(range(10)) for key in keys}
    assert sorted(d.attempt for d in got)[-5:] == [2] * 5


async def test_an_ordered_service_keeps_each_key_in_order_across_replicas_coming_and_going(
    bus_for: BusFor, tmp_path: Path
) -> None:
    # given replicas of an ordered service whose handler takes a random short while (competing
    # replicas would overtake each other)
    handled: list[tuple[str, int]] = []
    rng = random.Random(7)
    service = Service(unique("orders"))

    @service.on(Step, ordered_by="order_id")
    async def record(event: Step, ctx: Context) -> None:
        await asyncio.sleep(rng.uniform(0, 0.005))
        handled.append((event.order_id, event.n))

    bus = await bus_for(service.name)
    url = transport_url_of(bus)

    def replica() -> Runtime:
        return Runtime(
            App("ordering", [service]),
            transport=url,
            store=f"sqlite:///{tmp_path}/{{service}}.db",  # one store, as replicas share
            settings=WorkerSettings(concurrency=2, batch_size=4, poll_interval=0.2, lease=10),
        )

    keys = [f"k{i}" for i in range(8)]
    sent = interleaved(keys, 24)
    first, second, third = replica(), replica(), replica()
    await first.start()
    await second.start()
    try:
        # when the keys' events are published while a third replica joins and the first stops
        await publish(bus, sent[:64])
        await wait_for(lambda: len(handled) >= 32)
        await third.start()
        await publish(bus, sent[64:128])
        await wait_for(lambda: len(handled) >= 96)
        await first.stop()
        await publish(bus, sent[128:])
        await wait_for(lambda: len(set(handled)) >= len(sent))
    finally:
        for runtime in (first, second, third):
            await runtime.stop()

    # then each key's events were handled once each, in publish order
    assert by_key(handled) == {key: list(range(24)) for key in keys}


def transport_url_of(bus: Transport) -> str:
    return bus.settings.url  # type: ignore[attr-defined, no-any-return]
