"""drone-scheduler: reserves a drone of a finite fleet for each delivery, and frees it again.

The fleet is a table, a row per drone. A free drone is picked with ``SELECT ... FOR UPDATE SKIP
LOCKED`` on PostgreSQL: replicas reserving at the same time each lock a different row, so no
drone is ever reserved twice and none waits for another's transaction. SQLite has neither row
locks nor a second writer (a transaction holds the database's write lock from its start), so a
plain select is already exclusive there; SQLAlchemy leaves ``FOR UPDATE`` out on SQLite.

The statements are Core statements built once and run on the session's connection: each stays in
SQLAlchemy's compiled cache, and none goes through the ORM's unit of work (loading a ``Drone``
and flushing its change costs several times more CPU than the statements themselves).
"""

from __future__ import annotations

from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from choreograph import Context, RetryLater, RetryPolicy, Service
from choreograph.demo.events import (
    DeliveryCompleted,
    DeliveryFailed,
    DeliveryRequested,
    DroneScheduled,
    DroneUnavailable,
)
from choreograph.demo.knobs import Knobs, chance
from choreograph.demo.tables import Drone, DroneTables
from choreograph.demo.transient import maybe_fail

#: While the fleet is busy a request waits (retries) this many times before giving up.
FLEET_WAIT = RetryPolicy(max_attempts=8, immediate=0, base_delay=0.2, max_delay=2.0)

#: A free drone, locked for this transaction; one another transaction holds is skipped.
FREE_DRONE = (
    select(Drone.drone_id)
    .where(Drone.status == "free")
    .order_by(Drone.drone_id)
    .limit(1)
    .with_for_update(skip_locked=True)
)
#: The drone already reserved for a delivery (its request is handled again after a retry).
HELD_DRONE = select(Drone.drone_id).where(Drone.delivery_id == bindparam("delivery"))
RESERVE = (
    update(Drone)
    .where(Drone.drone_id == bindparam("drone"))
    .values(status="reserved", delivery_id=bindparam("delivery"))
)
FREE = (
    update(Drone)
    .where(Drone.delivery_id == bindparam("delivery"))
    .values(status="free", delivery_id=None)
)


def drone_id(number: int) -> str:
    return f"drone-{number:04d}"


async def ensure_fleet(session: AsyncSession, size: int) -> bool:
    """Create the fleet's rows the first time (replicas doing it at once insert each row once);
    says whether the fleet was missing."""
    if await session.scalar(select(Drone.drone_id).limit(1)) is not None:
        return False
    dialect = session.bind.dialect.name if session.bind is not None else ""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    rows = [{"drone_id": drone_id(n), "status": "free"} for n in range(1, size + 1)]
    await session.execute(insert(Drone).values(rows).on_conflict_do_nothing())
    return True


def build(knobs: Knobs) -> Service:
    scheduler = Service(
        "drone-scheduler",
        retry=FLEET_WAIT,
        description="Reserves and frees drones of the fleet.",
        tables=DroneTables.metadata,
    )

    @scheduler.on(DeliveryRequested, emits=[DroneScheduled, DroneUnavailable])
    async def reserve_drone(
        event: DeliveryRequested, ctx: Context
    ) -> DroneScheduled | DroneUnavailable | None:
        if knobs.silent_drone_scheduler:
            return None  # consumes and never answers: delivery's deadline must notice
        maybe_fail(knobs, "drone-scheduler", event.delivery_id, ctx.attempt)
        connection = await ctx.session.connection()
        delivery = {"delivery": event.delivery_id}
        held = (await connection.execute(HELD_DRONE, delivery)).scalar()
        drone = held or (await connection.execute(FREE_DRONE)).scalar()
        if drone is None and await ensure_fleet(ctx.session, knobs.fleet_size):
            drone = (await connection.execute(FREE_DRONE)).scalar()
        if drone is None:
            if ctx.attempt < FLEET_WAIT.max_attempts:
                raise RetryLater("every drone is busy")
            return DroneUnavailable(
                delivery_id=event.delivery_id, reason=f"all {knobs.fleet_size} drones are busy"
            )
        if held is None:
            await connection.execute(RESERVE, {"drone": drone, **delivery})
        scheduled = DroneScheduled(delivery_id=event.delivery_id, drone_id=drone)
        if chance(knobs.slow_drone_rate, "slow", event.delivery_id):
            ctx.emit_later(scheduled, knobs.slow_drone_seconds)
            return None
        return scheduled

    async def free_drone(ctx: Context, delivery_id: str) -> None:
        connection = await ctx.session.connection()
        await connection.execute(FREE, {"delivery": delivery_id})

    # A request arriving after its delivery ended is late: the runtime does not run
    # reserve_drone for it, so freeing what is reserved now is enough, in any order of arrival.
    @scheduler.compensate(DeliveryFailed, undoes=reserve_drone)
    async def release_drone(event: DeliveryFailed, ctx: Context) -> None:
        await free_drone(ctx, event.delivery_id)

    @scheduler.on(DeliveryCompleted)
    async def drone_back(event: DeliveryCompleted, ctx: Context) -> None:
        await free_drone(ctx, event.delivery_id)

    return scheduler
