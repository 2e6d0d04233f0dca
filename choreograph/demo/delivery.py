"""delivery: joins the package and the drone of each delivery, flies it, or fails it.

It is the only service that decides a delivery's fate, so each delivery gets exactly one terminal
event: ``DeliveryCompleted`` or ``DeliveryFailed``.
"""

from __future__ import annotations

from choreograph import Context, HandlerFailed, JoinTimedOut, Parts, Service
from choreograph.demo.events import (
    DeliveryCancelRequested,
    DeliveryCompleted,
    DeliveryFailed,
    DeliveryRequested,
    DeliveryScheduled,
    DroneArrived,
    DroneScheduled,
    DroneUnavailable,
    PackageReady,
    PackageRejected,
)
from choreograph.demo.knobs import Knobs


def build(knobs: Knobs) -> Service:
    delivery = Service("delivery", description="Schedules, flies and completes deliveries.")

    async def fail(
        ctx: Context, delivery_id: str, reason: str, stage: str
    ) -> DeliveryFailed | None:
        """Fail the delivery unless it already ended or took off."""
        doc = await ctx.state.get("delivery", delivery_id) or {}
        if doc.get("status") in ("failed", "completed", "in_flight"):
            return None
        await ctx.state.put("delivery", delivery_id, {**doc, "status": "failed", "reason": reason})
        return DeliveryFailed(delivery_id=delivery_id, reason=reason, stage=stage)

    async def join_timed_out(timeout: JoinTimedOut, ctx: Context) -> DeliveryFailed | None:
        missing = ", ".join(timeout.missing)
        return await fail(ctx, timeout.key, f"timed out waiting for {missing}", "scheduling")

    @delivery.join(
        PackageReady,
        DroneScheduled,
        key="delivery_id",
        within=knobs.join_timeout,
        starts_on=DeliveryRequested,
        on_timeout=join_timed_out,
        emits=[DeliveryScheduled, DroneArrived, DeliveryFailed],
    )
    async def schedule_delivery(parts: Parts, ctx: Context) -> DeliveryScheduled | None:
        package, drone = parts[PackageReady], parts[DroneScheduled]
        doc = await ctx.state.get("delivery", package.delivery_id) or {}
        if doc.get("status") == "failed":
            return None
        await ctx.state.put(
            "delivery",
            package.delivery_id,
            {"status": "in_flight", "drone_id": drone.drone_id, "package_id": package.package_id},
        )
        ctx.emit_later(
            DroneArrived(delivery_id=package.delivery_id, drone_id=drone.drone_id),
            knobs.flight_seconds,
        )
        return DeliveryScheduled(
            delivery_id=package.delivery_id,
            drone_id=drone.drone_id,
            package_id=package.package_id,
            flight_seconds=knobs.flight_seconds,
        )

    @delivery.on(DroneArrived, emits=[DeliveryCompleted])
    async def complete_delivery(event: DroneArrived, ctx: Context) -> DeliveryCompleted | None:
        doc = await ctx.state.get("delivery", event.delivery_id) or {}
        if doc.get("status") != "in_flight":
            return None
        await ctx.state.put("delivery", event.delivery_id, {**doc, "status": "completed"})
        return DeliveryCompleted(
            delivery_id=event.delivery_id, drone_id=event.drone_id, package_id=doc["package_id"]
        )

    @delivery.on(PackageRejected, emits=[DeliveryFailed])
    async def package_rejected(event: PackageRejected, ctx: Context) -> DeliveryFailed | None:
        return await fail(ctx, event.delivery_id, f"package rejected: {event.reason}", "package")

    @delivery.on(DroneUnavailable, emits=[DeliveryFailed])
    async def no_drone(event: DroneUnavailable, ctx: Context) -> DeliveryFailed | None:
        return await fail(ctx, event.delivery_id, f"no drone: {event.reason}", "drone")

    @delivery.on(DeliveryCancelRequested, emits=[DeliveryFailed])
    async def cancel(event: DeliveryCancelRequested, ctx: Context) -> DeliveryFailed | None:
        return await fail(ctx, event.delivery_id, f"cancelled: {event.reason}", "cancel")

    @delivery.on(HandlerFailed, emits=[DeliveryFailed])
    async def participant_failed(event: HandlerFailed, ctx: Context) -> DeliveryFailed | None:
        delivery_id = str(event.data.get("delivery_id") or ctx.correlation_id)
        reason = f"{event.service} gave up on {event.failed_event_type}: {event.reason}"
        return await fail(ctx, delivery_id, reason, event.service)

    return delivery
