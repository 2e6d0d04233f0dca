"""The runtime on PostgreSQL stores: two replicas of three services share one schema per service.

A drone scheduler reserves drones with ``find`` + ``put``, billing charges, dispatch joins both;
the scheduler's deadline fires for every order. Each handling counts itself in a document, so a
message handled twice, a timer fired twice or a drone reserved twice shows up as a count of 2.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from choreograph import (
    App,
    Context,
    DeadlineExpired,
    Event,
    Parts,
    Runtime,
    Service,
    WorkerSettings,
)
from choreograph.store import store_from_url
from choreograph.transports.memory import MemoryTransport
from tests.stores.conftest import PG_URL

pytestmark = pytest.mark.postgres

DRONES = 30


class OrderPlaced(Event):
    order: str


class DroneAssigned(Event):
    order: str
    drone: str


class Charged(Event):
    order: str
    amount: int


class Delivered(Event):
    order: str


class Dispatched(Event):
    order: str
    drone: str


scheduler = Service("drone-scheduler")
billing = Service("billing")
dispatch = Service("dispatch")


async def count_once(ctx: Context, kind: str, key: str, **fields: object) -> None:
    doc = await ctx.state.get(kind, key) or {"times": 0}
    await ctx.state.put(kind, key, {**doc, **fields, "times": doc["times"] + 1})


@scheduler.on(OrderPlaced, emits=[DroneAssigned])
async def assign_drone(event: OrderPlaced, ctx: Context) -> DroneAssigned | None:
    found = await ctx.state.find("drone", {"status": "free"}, limit=1)
    if not found:
        return None
    drone, doc = found[0]
    await ctx.state.put("drone", drone, {**doc, "status": "reserved", "order": event.order})
    await count_once(ctx, "assigned", event.order, drone=drone)
    return DroneAssigned(order=event.order, drone=drone)


@scheduler.deadline(starts_on=OrderPlaced, expect=[Delivered], within=0.3)
async def delivery_overdue(expired: DeadlineExpired, ctx: Context) -> None:
    await count_once(ctx, "overdue", expired.key)


@billing.on(OrderPlaced, emits=[Charged])
async def charge(event: OrderPlaced, ctx: Context) -> Charged:
    await count_once(ctx, "charge", event.order)
    return Charged(order=event.order, amount=42)


@dispatch.join(DroneAssigned, Charged, key="order", emits=[Dispatched])
async def dispatch_drone(parts: Parts, ctx: Context) -> Dispatched:
    drone = parts[DroneAssigned].drone
    await count_once(ctx, "dispatched", parts.key, drone=drone)
    return Dispatched(order=parts.key, drone=drone)


APP = App("drones", [scheduler, billing, dispatch])
# Small batches and several lanes: many transactions of one service in flight at once.
SETTINGS = WorkerSettings(concurrency=3, batch_size=4, housekeeping_interval=0.02)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def counts(runtime: Runtime, service: str, kind: str) -> dict[str, int]:
    async with runtime.unit_of_work(service) as uow:
        return {key: doc["times"] for key, doc in await uow.state.find(kind, limit=1000)}


async def place_orders(runtime: Runtime, orders: list[str]) -> None:
    for order in orders:
        await runtime.publish(OrderPlaced(order=order), source="test", correlation_id=order)


async def test_replicas_on_postgres_handle_everything_exactly_once(pg_namespace: str) -> None:
    store = f"{PG_URL}?schema={pg_namespace}_{{service}}"
    bus = MemoryTransport()
    replicas = [Runtime(APP, transport=bus, store=store, settings=SETTINGS) for _ in range(2)]
    orders = [f"o{i:02}" for i in range(20)]

    # given two replicas of every service, and free drones
    for runtime in replicas:
        await runtime.start()
    try:
        async with replicas[0].unit_of_work("drone-scheduler") as uow:
            for i in range(DRONES):
                await uow.state.put("drone", f"d{i:02}", {"status": "free"})

        # when orders come in
        await place_orders(replicas[0], orders)

        # then each is charged, assigned a drone, dispatched and found overdue exactly once
        async def all_done() -> bool:
            dispatched = await counts(replicas[1], "dispatch", "dispatched")
            overdue = await counts(replicas[0], "drone-scheduler", "overdue")
            return len(dispatched) == len(overdue) == len(orders)

        await eventually(all_done)
        for service, kind in [
            ("billing", "charge"),
            ("drone-scheduler", "assigned"),
            ("drone-scheduler", "overdue"),
            ("dispatch", "dispatched"),
        ]:
            assert await counts(replicas[0], service, kind) == dict.fromkeys(orders, 1), kind
    finally:
        await asyncio.gather(*(runtime.stop() for runtime in replicas))

    # and no drone went to two orders
    scheduler_store = store_from_url(store, "drone-scheduler")
    await scheduler_store.open()
    try:
        async with scheduler_store.transaction() as tx:
            reserved = await tx.find("drone", {"status": "reserved"}, limit=100)
            assigned = await tx.find("assigned", limit=100)
        assert sorted(doc["order"] for _, doc in reserved) == orders
        assert sorted(doc["drone"] for _, doc in assigned) == sorted(key for key, _ in reserved)
        assert await scheduler_store.next_timer_due() is None
    finally:
        await scheduler_store.close()

    # and a restarted runtime carries on from the state the replicas left
    async with Runtime(APP, transport="memory://", store=store, settings=SETTINGS) as runtime:
        await place_orders(runtime, ["late1", "late2"])

        async def late_ones_dispatched() -> bool:
            return len(await counts(runtime, "dispatch", "dispatched")) == len(orders) + 2

        await eventually(late_ones_dispatched)
        async with runtime.unit_of_work("drone-scheduler") as uow:
            assert await uow.state.count("drone", {"status": "free"}) == DRONES - len(orders) - 2
