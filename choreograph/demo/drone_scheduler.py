"""drone-scheduler: reserves a drone of a finite fleet for each delivery, and frees it again."""

from __future__ import annotations

from choreograph import Context, RetryLater, RetryPolicy, Service
from choreograph.demo.events import (
    DeliveryCompleted,
    DeliveryFailed,
    DeliveryRequested,
    DroneScheduled,
    DroneUnavailable,
)
from choreograph.demo.knobs import Knobs, chance
from choreograph.demo.transient import maybe_fail

#: While the fleet is busy a request waits (retries) this many times before giving up.
FLEET_WAIT = RetryPolicy(max_attempts=8, immediate=0, base_delay=0.2, max_delay=2.0)


def drone_id(number: int) -> str:
    return f"drone-{number:04d}"


def build(knobs: Knobs) -> Service:
    scheduler = Service(
        "drone-scheduler", retry=FLEET_WAIT, description="Reserves and frees drones of the fleet."
    )

    async def ensure_fleet(ctx: Context) -> None:
        # count locks nothing (a get would lock the fleet document: one reservation at a time
        # across replicas); two creating it at once collide on the first drone and one waits.
        if not await ctx.state.count("fleet"):
            for number in range(1, knobs.fleet_size + 1):
                await ctx.state.put("drone", drone_id(number), {"status": "free", "delivery": ""})
            await ctx.state.put("fleet", "size", {"drones": knobs.fleet_size})

    @scheduler.on(DeliveryRequested, emits=[DroneScheduled, DroneUnavailable])
    async def reserve_drone(
        event: DeliveryRequested, ctx: Context
    ) -> DroneScheduled | DroneUnavailable | None:
        if knobs.silent_drone_scheduler:
            return None  # consumes and never answers: delivery's deadline must notice
        maybe_fail(knobs, "drone-scheduler", event.delivery_id, ctx.attempt)
        await ensure_fleet(ctx)
        held = await ctx.state.find("drone", {"delivery": event.delivery_id}, limit=1)
        # skip_locked: a drone another replica is reserving right now is not free for this one
        free = held or await ctx.state.find("drone", {"status": "free"}, limit=1, skip_locked=True)
        if not free:
            if ctx.attempt < FLEET_WAIT.max_attempts:
                raise RetryLater("every drone is busy")
            return DroneUnavailable(
                delivery_id=event.delivery_id, reason=f"all {knobs.fleet_size} drones are busy"
            )
        drone, _ = free[0]
        await ctx.state.put("drone", drone, {"status": "reserved", "delivery": event.delivery_id})
        scheduled = DroneScheduled(delivery_id=event.delivery_id, drone_id=drone)
        if chance(knobs.slow_drone_rate, "slow", event.delivery_id):
            ctx.emit_later(scheduled, knobs.slow_drone_seconds)
            return None
        return scheduled

    async def free_drone(ctx: Context, delivery_id: str) -> None:
        for drone, _ in await ctx.state.find("drone", {"delivery": delivery_id}):
            await ctx.state.put("drone", drone, {"status": "free", "delivery": ""})

    # A request arriving after its delivery ended is late: the runtime does not run
    # reserve_drone for it, so freeing what is reserved now is enough, in any order of arrival.
    @scheduler.compensate(DeliveryFailed, undoes=reserve_drone)
    async def release_drone(event: DeliveryFailed, ctx: Context) -> None:
        await free_drone(ctx, event.delivery_id)

    @scheduler.on(DeliveryCompleted)
    async def drone_back(event: DeliveryCompleted, ctx: Context) -> None:
        await free_drone(ctx, event.delivery_id)

    return scheduler
