"""``single_active``: a RabbitMQ group whose queue has a single active consumer keeps its messages
in publish order across members, also when the active one is killed (``docs/ordering.md``)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from choreograph import (
    App,
    Context,
    RetryLater,
    RetryPolicy,
    Runtime,
    Service,
    WorkerSettings,
)
from choreograph.errors import ConfigurationError
from choreograph.transport import Delivery, Message, Transport, transport_from_url
from tests.conformance._helpers import ids, message, receive_for, unique
from tests.conformance.test_ordering import Step, by_key, interleaved
from tests.support.brokers import RABBITMQ

pytestmark = pytest.mark.rabbitmq
HANG_GUARD = 90.0
BASE = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def bus_for() -> AsyncIterator[Callable[[str], object]]:
    """Connected transports on a namespace of the test's own, ``single_active`` for a group."""
    RABBITMQ.require()
    namespace = unique("ns")
    opened: list[Transport] = []

    async def make(group: str) -> Transport:
        bus = transport_from_url(f"{BASE}?namespace={namespace}&single_active={group}")
        await bus.connect()
        opened.append(bus)
        return bus

    yield make
    await opened[0].delete_namespace()
    for bus in opened:
        await bus.close()


async def receive_all(sub: object, count: int) -> list[Delivery]:
    got: list[Delivery] = []
    async with asyncio.timeout(HANG_GUARD):
        while len(got) < count:
            batch = await sub.receive(count, 1.0)  # type: ignore[attr-defined]
            await sub.ack(batch)  # type: ignore[attr-defined]
            got += batch
    return got


async def test_the_claim_is_made_for_single_active_groups_only(bus_for) -> None:  # type: ignore[no-untyped-def]
    bus = await bus_for("orders")
    assert bus.orders_across_members("orders")
    assert not bus.orders_across_members("billing")


async def test_a_standby_member_takes_over_in_order_when_the_active_one_is_killed(
    bus_for,  # type: ignore[no-untyped-def]
) -> None:
    # given a single-active group, and a member in its own process holding 5 of 10 messages
    group, topic = unique("g"), unique("t")
    bus = await bus_for(group)
    await bus.declare_group(group, [topic])
    sent = [message(topic) for _ in range(20)]
    await bus.publish(sent[:10])
    url = f"{BASE}?namespace={bus.settings.namespace}&single_active={group}"
    member = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.conformance._member", url, group, topic, "30", "5",
        stdout=asyncio.subprocess.PIPE, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert member.stdout is not None
    try:
        async with asyncio.timeout(HANG_GUARD):
            while (await member.stdout.readline()).strip() != b"holding":
                pass

        # when a second member subscribes, 10 more are published, and the first is killed
        standby = await bus.subscribe(group, [topic], lease=30)
        assert await receive_for(standby, 1.0) == []  # it stands by while the first is active
        await bus.publish(sent[10:])
    finally:
        os.kill(member.pid, signal.SIGKILL)
        await member.wait()

    # then the second receives all 20, in publish order, the killed member's first
    got = await receive_all(standby, 20)
    assert ids(got) == ids(sent)
    assert [d.attempt for d in got[:5]] == [2] * 5


async def test_ordering_per_key_holds_across_two_replicas(
    bus_for,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    # given two replicas of an ordered service on a single-active group, whose handler takes a
    # random short while (so that competing replicas would overtake each other) and fails one
    # event in four on its first attempt (retried after 50 ms)
    handled: list[tuple[str, int]] = []
    rng = random.Random(5)
    failing = {(f"k{i}", n) for i in range(6) for n in range(8) if (i + n) % 4 == 0}
    service = Service("orders", retry=RetryPolicy(max_attempts=3, base_delay=0.05, jitter=0))

    @service.on(Step, ordered_by="order_id")
    async def record(event: Step, ctx: Context) -> None:
        await asyncio.sleep(rng.uniform(0, 0.01))
        if ctx.attempt == 1 and (event.order_id, event.n) in failing:
            raise RetryLater("transient", delay=0.05)
        handled.append((event.order_id, event.n))

    bus = await bus_for("orders")
    # a small prefetch, so that without single_active both replicas would hold events at once
    url = f"{BASE}?namespace={bus.settings.namespace}&single_active=orders&prefetch=16"
    replicas = [
        Runtime(
            App("ordering", [service]),
            transport=url,
            store=f"sqlite:///{tmp_path}/{{service}}.db",  # one store, as replicas share
            settings=WorkerSettings(concurrency=2, batch_size=2, poll_interval=0.2),
        )
        for _ in range(2)
    ]
    keys = [f"k{i}" for i in range(6)]
    async with replicas[0], replicas[1]:
        # when the keys' events are published, interleaved
        sent: list[Message] = interleaved(keys, 8)
        for start in range(0, len(sent), 6):
            await bus.publish(sent[start : start + 6])
        async with asyncio.timeout(HANG_GUARD):
            while len(handled) < len(sent):  # noqa: ASYNC110 - polls the handlers' record
                await asyncio.sleep(0.01)

    # then each key's events were handled once each, in publish order
    assert by_key(handled) == {key: list(range(8)) for key in keys}


def test_single_active_names_groups() -> None:
    settings = transport_from_url(f"{BASE}?single_active=fleet,+billing").settings  # type: ignore[attr-defined]
    assert settings.single_active_groups == frozenset({"fleet", "billing"})
    with pytest.raises(ConfigurationError, match="invalid group"):
        transport_from_url(f"{BASE}?single_active=fleet,bad.name")
