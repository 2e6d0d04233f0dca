"""package: creates the package of each delivery in its own table, or rejects it."""

from __future__ import annotations

from sqlalchemy import update

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
        await ctx.session.merge(
            Package(
                package_id=info.package_id,
                delivery_id=event.delivery_id,
                status="rejected" if reason else "ready",
                weight_kg=info.weight_kg,
            )
        )
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
        await ctx.session.execute(
            update(Package)
            .where(Package.delivery_id == event.delivery_id, Package.status == "ready")
            .values(status="released")
        )

    @package.on(DeliveryCompleted)
    async def mark_delivered(event: DeliveryCompleted, ctx: Context) -> None:
        await ctx.session.execute(
            update(Package).where(Package.package_id == event.package_id).values(status="delivered")
        )

    return package
