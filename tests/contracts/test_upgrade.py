"""Versions and upcasting across an upgrade: events of version 1 left in a queue and in the dead
letters are handled by version 2; a rolling upgrade (old and new replicas of the same groups side by
side while deliveries flow, then the old retired) ends every delivery and dead-letters nothing, on
SQLite and on NATS."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from choreograph import Runtime
from choreograph.transport import transport_from_url
from tests.contracts.versions import RequestedV1, RequestedV2, Seen, build
from tests.support.brokers import NATS

WAIT = 120.0  # hang guard only: every wait below polls for what it expects


class Journal:
    """Every handling of both versions, as the handlers report them."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    def __call__(self, seen: Seen) -> None:
        self.seen.append(seen)

    def of(self, service: str, code_version: int | None = None) -> list[Seen]:
        return [
            s for s in self.seen if s.service == service and code_version in (None, s.code_version)
        ]

    def booked(self) -> set[str]:
        return {s.delivery_id for s in self.of("ledger")}


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {WAIT}s for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture(params=["sqlite", pytest.param("nats", marks=pytest.mark.nats)])
async def bus(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/bus.db"
        return
    NATS.require()
    url = f"nats://127.0.0.1:4222?namespace=upgrade_{uuid.uuid4().hex[:10]}"
    try:
        yield url
    finally:
        transport = transport_from_url(url)
        await transport.connect()
        with contextlib.suppress(Exception):
            await transport.delete_namespace()
        await transport.close()


async def dead_letters(url: str) -> list[object]:
    async with transport_from_url(url) as transport:
        return list(await transport.dead_letters(None, 1000))


async def test_version_1_events_in_a_queue_and_in_the_dead_letters_are_handled_by_version_2(
    tmp_path: Path,
) -> None:
    # given version 1 running, with a bug that dead-letters one delivery
    bus = f"sqlite:///{tmp_path}/bus.db"
    store = f"sqlite:///{tmp_path}/{{service}}.db"
    journal = Journal()
    old = build(1, journal, broken_prefix="broken")
    async with Runtime(old, transport=bus, store=store) as runtime:
        await runtime.publish(RequestedV1(delivery_id="broken-1", weight_kg=2), source="ingestion")
        (dead,) = await _wait_dead(bus)
    assert dead.group == "package" and dead.failure.reason == "permanent failure"

    # and one more version 1 event waiting in the queue while nothing runs
    async with Runtime(old, transport=bus, store=store, services=[]) as producer:
        await producer.publish(RequestedV1(delivery_id="queued-1", weight_kg=3), source="ingestion")

    # when version 2 starts and the dead letter is replayed
    new = build(2, journal)
    async with Runtime(new, transport=bus, store=store) as runtime:
        await until(lambda: "queued-1" in journal.booked(), "the queued event")
        assert await runtime.transport.replay(dead.id)
        await until(lambda: "broken-1" in journal.booked(), "the replayed dead letter")

    # then both were read as version 2 through the upcaster, and nothing is dead any more
    upcast = {s.delivery_id: s.detail for s in journal.of("package", 2)}
    assert upcast == {"queued-1": "standard", "broken-1": "standard"}
    assert {s.delivery_id for s in journal.of("delivery", 2)} == {"queued-1", "broken-1"}
    assert await dead_letters(bus) == []


async def _wait_dead(bus: str) -> list[object]:
    found: list[object] = []

    async def some() -> None:
        nonlocal found
        found = await dead_letters(bus)

    deadline = time.monotonic() + WAIT
    while not found:
        if time.monotonic() > deadline:
            raise TimeoutError("no dead letter")
        await some()
        await asyncio.sleep(0.05)
    return found


@pytest.mark.slow
async def test_rolling_upgrade_old_and_new_replicas_side_by_side_then_the_old_retired(
    bus: str, tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path}/{{service}}.db"
    journal = Journal()
    old, new = build(1, journal), build(2, journal)
    consumers = ["package", "delivery"]
    ledger = Runtime(new, transport=bus, store=store, services=["ledger"])
    old_producer = Runtime(old, transport=bus, store=store, services=[])
    new_producer = Runtime(new, transport=bus, store=store, services=[])
    old_consumers = Runtime(old, transport=bus, store=store, services=consumers)
    new_consumers = Runtime(new, transport=bus, store=store, services=consumers)
    await ledger.start()
    await old_producer.start()
    await new_producer.start()
    sent: set[str] = set()

    async def send_v1(name: str) -> None:
        await old_producer.publish(RequestedV1(delivery_id=name, weight_kg=1), source="ingestion")
        sent.add(name)

    async def send_v2(name: str) -> None:
        event = RequestedV2(delivery_id=name, weight_kg=1, priority="express")
        await new_producer.publish(event, source="ingestion")
        sent.add(name)

    try:
        # given only the old replicas, reading what a new producer already emits (version 2)
        await old_consumers.start()
        for n in range(10):
            await send_v2(f"early-v2-{n}")
        await until(lambda: journal.booked() >= sent, "the old replicas to end version 2 events")

        # when the new replicas join the same groups while both producers emit
        await new_consumers.start()
        for n in range(30):
            await send_v1(f"mixed-v1-{n}")
            await send_v2(f"mixed-v2-{n}")
        # and the old replicas are retired while deliveries flow
        for n in range(10):
            await send_v1(f"retiring-v1-{n}")
            await send_v2(f"retiring-v2-{n}")
        await old_consumers.stop()
        # and an old producer still emits version 1 after its consumers are gone
        for n in range(10):
            await send_v1(f"late-v1-{n}")
        await until(lambda: journal.booked() >= sent, "every delivery to end")
    finally:
        for runtime in (new_consumers, old_consumers, new_producer, old_producer, ledger):
            if runtime.started:
                await runtime.stop()

    # then every delivery ended, nothing was dead-lettered
    assert journal.booked() == sent and len(sent) == 100
    assert await dead_letters(bus) == []
    # and the old code read version 2 tolerantly, the new code version 1 through the upcasters
    old_package = {s.delivery_id: s.detail for s in journal.of("package", 1)}
    assert {f"early-v2-{n}" for n in range(10)} <= set(old_package)
    assert set(old_package.values()) == {"-"}
    new_package = {s.delivery_id: s.detail for s in journal.of("package", 2)}
    assert {f"late-v1-{n}" for n in range(10)} <= set(new_package)
    assert all(new_package[n] == ("standard" if "-v1-" in n else "express") for n in new_package)
    new_delivery = {s.delivery_id: s.detail for s in journal.of("delivery", 2)}
    # a PackageReady of version 1 (from an old package replica) reads with the upcast dock
    assert {new_delivery[n] for n in new_delivery if n in old_package} <= {"A"}
    assert {new_delivery[n] for n in new_delivery if n in new_package} <= {"B"}


async def test_a_join_part_kept_before_the_upgrade_is_read_through_the_upcaster(
    tmp_path: Path,
) -> None:
    from typing import Any, ClassVar

    from choreograph import App, Context, Event, Parts, Service
    from tests.contracts.versions import DeliveryCompleted, ReadyV1, ReadyV2

    class Scheduled(Event):
        event_type: ClassVar[str] = "DroneScheduled"
        delivery_id: str

    docks: list[str] = []

    def app(ready: type[Event]) -> App:
        outside = Service("outside", emits=[ready, Scheduled])
        delivery = Service("delivery")

        @delivery.join(ready, Scheduled, key="delivery_id", emits=[DeliveryCompleted])
        async def schedule(parts: Parts, ctx: Context) -> DeliveryCompleted:
            part: Any = parts[ready]
            docks.append(getattr(part, "dock", "-"))
            return DeliveryCompleted(delivery_id=part.delivery_id)

        return App("join", [outside, delivery], terminal=[DeliveryCompleted])

    bus = f"sqlite:///{tmp_path}/bus.db"
    store = f"sqlite:///{tmp_path}/{{service}}.db"
    # given version 1 kept one part of a join (a PackageReady of version 1)
    old = app(ReadyV1)
    async with Runtime(old, transport=bus, store=store) as runtime:
        await runtime.publish(ReadyV1(delivery_id="j-1"), source="outside")
        kept: dict[str, Any] = {}
        deadline = time.monotonic() + WAIT
        while "PackageReady" not in kept.get("parts", {}):
            assert time.monotonic() < deadline, "the join never kept its first part"
            await asyncio.sleep(0.05)
            async with runtime.unit_of_work("delivery") as uow:
                kept = await uow.state.get("_join:schedule", "j-1") or {}
    assert kept["parts"]["PackageReady"]["data"] == {"delivery_id": "j-1"}
    # when version 2 receives the other part
    new = app(ReadyV2)
    async with Runtime(new, transport=bus, store=store) as runtime:
        await runtime.publish(Scheduled(delivery_id="j-1"), source="outside")
        await until(lambda: docks == ["A"], "the join to complete")
    # then the kept part was read as version 2 through the upcaster, and nothing died
    assert await dead_letters(bus) == []
