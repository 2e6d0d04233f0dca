"""The drone delivery orchestrated, for the comparison with the choreography (benchmarks only).

One more service, ``orchestrator``, drives each delivery: it commands every step (commands are
events addressed to one participant), waits for the replies, and keeps the saga's state in its
store (``saga`` documents: a read-modify-write per reply, in the reply's transaction). The
participants do nothing on their own: package, drone-scheduler and delivery only answer commands,
and they answer them with the demo's own operations (the handlers of
``choreograph.demo.package``, ``drone_scheduler`` and ``delivery`` are called, not copied), so
both ways do the same business work on the same runtime, stores and transport.

Per delivery: 12 messages (request, 6 commands, 5 replies) against the choreography's 6 events.
"""

from __future__ import annotations

from typing import Any

from choreograph import App, Context, Event, Parts, Service
from choreograph.demo import delivery, drone_scheduler, ingestion, notification, package
from choreograph.demo.events import (
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


class CreatePackage(Event):
    """orchestrator -> package; answered by PackageReady or PackageRejected."""

    request: DeliveryRequested


class ReserveDrone(Event):
    """orchestrator -> drone-scheduler; answered by DroneScheduled or DroneUnavailable."""

    request: DeliveryRequested


class ScheduleDelivery(Event):
    """orchestrator -> delivery; answered by DeliveryScheduled, then DroneArrived after the
    flight."""

    package: PackageReady
    drone: DroneScheduled


class CompleteDelivery(Event):
    """orchestrator -> delivery; answered by DeliveryCompleted (the terminal event)."""

    arrived: DroneArrived


class FinishDelivery(Event):
    """orchestrator -> package and drone-scheduler, after the delivery completed: mark the
    package delivered, bring the drone back (no answer)."""

    completed: DeliveryCompleted


class UndoDelivery(Event):
    """orchestrator -> package and drone-scheduler, after the delivery failed: release what
    was taken (no answer)."""

    failed: DeliveryFailed


def _operation(service: Service, event: type[Event]) -> Any:
    """The demo service's handler of ``event`` (the function itself, to call)."""
    return service.handlers[event].fn


def build_orchestrator() -> Service:
    orchestrator = Service("orchestrator", description="Commands each step of every delivery.")

    async def saga(ctx: Context, delivery_id: str) -> dict[str, Any]:
        return await ctx.state.get("saga", delivery_id) or {}

    @orchestrator.on(DeliveryRequested, emits=[CreatePackage, ReserveDrone])
    async def start(event: DeliveryRequested, ctx: Context) -> list[Event]:
        await ctx.state.put("saga", event.delivery_id, {"step": "reserving"})
        return [CreatePackage(request=event), ReserveDrone(request=event)]

    async def replied(ctx: Context, delivery_id: str, part: str, reply: Event) -> list[Event]:
        """Record one of the two replies; once both are in, schedule the delivery, or fail it
        and have what was taken released (only then: an undo must never overtake the command
        it undoes)."""
        doc = await saga(ctx, delivery_id)
        if doc.get("step") != "reserving":
            return []
        doc[part] = {"type": type(reply).__name__, **reply.model_dump(mode="json")}
        if "package" not in doc or "drone" not in doc:
            await ctx.state.put("saga", delivery_id, doc)
            return []
        if doc["package"]["type"] == "PackageRejected":
            reason, stage = f"package rejected: {doc['package']['reason']}", "package"
        elif doc["drone"]["type"] == "DroneUnavailable":
            reason, stage = f"no drone: {doc['drone']['reason']}", "drone"
        else:
            await ctx.state.put("saga", delivery_id, {**doc, "step": "scheduling"})
            package_ready = PackageReady.model_validate(doc["package"])
            drone = DroneScheduled.model_validate(doc["drone"])
            return [ScheduleDelivery(package=package_ready, drone=drone)]
        await ctx.state.put("saga", delivery_id, {**doc, "step": "failed", "reason": reason})
        failed = DeliveryFailed(delivery_id=delivery_id, reason=reason, stage=stage)
        return [failed, UndoDelivery(failed=failed)]

    answers = [ScheduleDelivery, DeliveryFailed, UndoDelivery]

    @orchestrator.on(PackageReady, emits=answers)
    async def package_ready(event: PackageReady, ctx: Context) -> list[Event]:
        return await replied(ctx, event.delivery_id, "package", event)

    @orchestrator.on(PackageRejected, emits=answers)
    async def package_rejected(event: PackageRejected, ctx: Context) -> list[Event]:
        return await replied(ctx, event.delivery_id, "package", event)

    @orchestrator.on(DroneScheduled, emits=answers)
    async def drone_scheduled(event: DroneScheduled, ctx: Context) -> list[Event]:
        return await replied(ctx, event.delivery_id, "drone", event)

    @orchestrator.on(DroneUnavailable, emits=answers)
    async def no_drone(event: DroneUnavailable, ctx: Context) -> list[Event]:
        return await replied(ctx, event.delivery_id, "drone", event)

    @orchestrator.on(DeliveryScheduled)
    async def in_flight(event: DeliveryScheduled, ctx: Context) -> None:
        doc = await saga(ctx, event.delivery_id)
        await ctx.state.put("saga", event.delivery_id, {**doc, "step": "in_flight"})

    @orchestrator.on(DroneArrived, emits=[CompleteDelivery])
    async def arrived(event: DroneArrived, ctx: Context) -> CompleteDelivery:
        return CompleteDelivery(arrived=event)

    @orchestrator.on(DeliveryCompleted, emits=[FinishDelivery])
    async def completed(event: DeliveryCompleted, ctx: Context) -> FinishDelivery:
        doc = await saga(ctx, event.delivery_id)
        await ctx.state.put("saga", event.delivery_id, {**doc, "step": "completed"})
        return FinishDelivery(completed=event)

    return orchestrator


def build_package(knobs: Knobs) -> Service:
    demo = package.build(knobs)
    create = _operation(demo, DeliveryRequested)
    release = _operation(demo, DeliveryFailed)
    mark_delivered = _operation(demo, DeliveryCompleted)
    participant = Service(
        "package",
        description="Answers the orchestrator's package commands.",
        tables=demo.tables,  # the demo's own tables
    )

    @participant.on(CreatePackage, emits=[PackageReady, PackageRejected])
    async def create_package(command: CreatePackage, ctx: Context) -> Any:
        return await create(command.request, ctx)

    @participant.on(FinishDelivery)
    async def finish(command: FinishDelivery, ctx: Context) -> None:
        await mark_delivered(command.completed, ctx)

    @participant.on(UndoDelivery)
    async def undo(command: UndoDelivery, ctx: Context) -> None:
        await release(command.failed, ctx)

    return participant


def build_drone_scheduler(knobs: Knobs) -> Service:
    demo = drone_scheduler.build(knobs)
    reserve = _operation(demo, DeliveryRequested)
    release = _operation(demo, DeliveryFailed)
    back = _operation(demo, DeliveryCompleted)
    participant = Service(
        "drone-scheduler",
        retry=demo.retry,
        description="Answers the orchestrator's drone commands.",
        tables=demo.tables,
    )

    @participant.on(ReserveDrone, emits=[DroneScheduled, DroneUnavailable])
    async def reserve_drone(command: ReserveDrone, ctx: Context) -> Any:
        return await reserve(command.request, ctx)

    @participant.on(FinishDelivery)
    async def finish(command: FinishDelivery, ctx: Context) -> None:
        await back(command.completed, ctx)

    @participant.on(UndoDelivery)
    async def undo(command: UndoDelivery, ctx: Context) -> None:
        await release(command.failed, ctx)

    return participant


def build_delivery(knobs: Knobs) -> Service:
    demo = delivery.build(knobs)
    schedule = demo.joins["schedule_delivery"].fn
    complete = _operation(demo, DroneArrived)
    participant = Service("delivery", description="Answers the orchestrator's flight commands.")

    @participant.on(ScheduleDelivery, emits=[DeliveryScheduled, DroneArrived])
    async def schedule_delivery(command: ScheduleDelivery, ctx: Context) -> Any:
        parts = {PackageReady: command.package, DroneScheduled: command.drone}
        return await schedule(Parts(command.package.delivery_id, parts), ctx)  # type: ignore[arg-type]

    @participant.on(CompleteDelivery, emits=[DeliveryCompleted])
    async def complete_delivery(command: CompleteDelivery, ctx: Context) -> Any:
        return await complete(command.arrived, ctx)

    return participant


def create_app(knobs: Knobs | None = None) -> App:
    """The orchestrated drone delivery; knobs default to the ``DRONE_*`` environment variables."""
    knobs = knobs or Knobs.from_env()
    return App(
        "drone-delivery-orchestrated",
        [
            ingestion.build_service(),
            build_orchestrator(),
            build_package(knobs),
            build_drone_scheduler(knobs),
            build_delivery(knobs),
            notification.build(),
        ],
        terminal=[DeliveryCompleted, DeliveryFailed],
        description="The drone delivery driven by an orchestrator (benchmark comparison).",
    )
