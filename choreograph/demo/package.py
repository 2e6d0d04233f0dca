"""package: creates the package of each delivery in its own store, or rejects it."""

from __future__ import annotations

from choreograph import Context, Service
from choreograph.demo.events import (
    DeliveryCompleted,
    DeliveryFailed,
    DeliveryRequested,
    PackageReady,
    PackageRejected,
)
from choreograph.demo.knobs import Knobs, chance
from choreograph.demo.transient import maybe_fail

MAX_WEIGHT_KG = 25.0


def build(knobs: Knobs) -> Service:
    package = Service("package", description="Creates or rejects the package of a delivery.")

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
        status = "rejected" if reason else "ready"
        await ctx.state.put(
            "package",
            info.package_id,
            {"delivery_id": event.delivery_id, "status": status, "weight_kg": info.weight_kg},
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
        for key, doc in await ctx.state.find("package", {"delivery_id": event.delivery_id}):
            if doc["status"] == "ready":
                await ctx.state.put("package", key, {**doc, "status": "released"})

    @package.on(DeliveryCompleted)
    async def mark_delivered(event: DeliveryCompleted, ctx: Context) -> None:
        doc = await ctx.state.get("package", event.package_id)
        if doc is not None:
            await ctx.state.put("package", event.package_id, {**doc, "status": "delivered"})

    return package
