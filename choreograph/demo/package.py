"""package: creates the package of each delivery in its own table, or rejects it."""

from __future__ import annotations

from sqlalchemy import bindparam, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import Executable

from choreograph import Context, Service
from choreograph.demo.events import (
    DeliveryCompleted,
    DeliveryFailed,
    DeliveryRequested,
    PackageReady,
    PackageRejected,
)
from choreograph.demo.knobs import Knobs, chance
from choreograph.demo.tables import Package, PackageTables
from choreograph.demo.transient import maybe_fail

MAX_WEIGHT_KG = 25.0


def _postgres_upsert() -> Executable:
    statement = postgresql.insert(Package)
    changes = {name: statement.excluded[name] for name in ("delivery_id", "status", "weight_kg")}
    return statement.on_conflict_do_update(index_elements=[Package.package_id], set_=changes)


def _sqlite_upsert() -> Executable:
    statement = sqlite.insert(Package)
    changes = {name: statement.excluded[name] for name in ("delivery_id", "status", "weight_kg")}
    return statement.on_conflict_do_update(index_elements=[Package.package_id], set_=changes)


# Core statements built once, run on the session's connection: each stays in SQLAlchemy's
# compiled cache, and none goes through the ORM's unit of work (a merge would SELECT, then flush).
#: The package's row, written whether or not it exists (a redelivered request writes it again).
UPSERT = {"postgresql": _postgres_upsert(), "sqlite": _sqlite_upsert()}
RELEASE = (
    update(Package)
    .where(Package.delivery_id == bindparam("delivery"), Package.status == "ready")
    .values(status="released")
)
DELIVERED = (
    update(Package).where(Package.package_id == bindparam("package")).values(status="delivered")
)


def build(knobs: Knobs) -> Service:
    package = Service(
        "package",
        description="Creates or rejects the package of a delivery.",
        tables=PackageTables.metadata,
    )

    @package.on(DeliveryRequested, emits=[PackageReady, PackageRejected])
    async def create_package(
        event: DeliveryRequested, ctx: Context
    ) -> PackageReady | PackageRejected | None:
        maybe_fail(knobs, "package", event.delivery_id, ctx.attempt)
        info = event.package
        reason = ""
        if info.weight_kg > MAX_WEIGHT_KG:
            reason = f"package weighs {info.weight_kg} kg; the limit is {MAX_WEIGHT_KG} kg"
        elif chance(knobs.rejection_rate, "reject", event.delivery_id):
            reason = "package failed inspection"
        connection = await ctx.session.connection()
        row = {
            "package_id": info.package_id,
            "delivery_id": event.delivery_id,
            "status": "rejected" if reason else "ready",
            "weight_kg": info.weight_kg,
        }
        await connection.execute(UPSERT[connection.dialect.name], row)
        if reason:
            return PackageRejected(
                delivery_id=event.delivery_id, package_id=info.package_id, reason=reason
            )
        return PackageReady(
            delivery_id=event.delivery_id, package_id=info.package_id, weight_kg=info.weight_kg
        )

    # A request arriving after its delivery ended is late: the runtime does not run
    # create_package for it, so releasing what exists now is enough, in any order of arrival.
    @package.compensate(DeliveryFailed, undoes=create_package)
    async def release_package(event: DeliveryFailed, ctx: Context) -> None:
        connection = await ctx.session.connection()
        await connection.execute(RELEASE, {"delivery": event.delivery_id})

    @package.on(DeliveryCompleted)
    async def mark_delivered(event: DeliveryCompleted, ctx: Context) -> None:
        connection = await ctx.session.connection()
        await connection.execute(DELIVERED, {"package": event.package_id})

    return package
