"""The orchestrated drone delivery of the benchmarks does the same business work as the
choreography: every step commanded by the orchestrator, answered with the demo's operations."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from benchmarks.orchestrated import (
    CreatePackage,
    FinishDelivery,
    ReserveDrone,
    ScheduleDelivery,
    UndoDelivery,
    create_app,
)
from choreograph.demo.events import (
    DeliveryCompleted,
    DeliveryFailed,
    DeliveryRequested,
    DroneScheduled,
)
from choreograph.testing import Harness
from tests.drone.conftest import calm_knobs, request_body

HarnessFactory = Callable[..., Awaitable[Harness]]


async def request(h: Harness, number: int, **body: object) -> str:
    doc = request_body(number, **body)  # type: ignore[arg-type]
    await h.publish(DeliveryRequested(**doc), correlation_id=doc["delivery_id"])
    return str(doc["delivery_id"])


async def test_an_orchestrated_delivery_completes_and_frees_its_drone(
    harness: HarnessFactory,
) -> None:
    # given the orchestrated app with a fleet of one drone
    h = await harness(create_app(calm_knobs(fleet_size=1)))
    # when a delivery is requested and its flight ends
    first = await request(h, 1)
    await h.settle()
    await h.advance(1)
    await h.wait_for(DeliveryCompleted, correlation_id=first)
    await h.settle()
    # then the orchestrator commanded every step and its saga completed
    for command in (CreatePackage, ReserveDrone, ScheduleDelivery, FinishDelivery):
        assert h.published(command, first), command.__name__
    saga = await h.state("orchestrator", "saga", first)
    assert saga is not None and saga["step"] == "completed"
    # and the only drone is free again: the next delivery gets it
    second = await request(h, 2)
    scheduled = await h.wait_for(DroneScheduled, correlation_id=second)
    assert scheduled.data["drone_id"] == "drone-0001"


async def test_a_rejected_package_fails_the_delivery_and_releases_the_drone(
    harness: HarnessFactory,
) -> None:
    # given the orchestrated app with a fleet of one drone, and a package too heavy to fly
    h = await harness(create_app(calm_knobs(fleet_size=1)))
    # when it is requested
    heavy = await request(h, 1, weight_kg=40.0)
    failed = await h.wait_for(DeliveryFailed, correlation_id=heavy)
    await h.settle()
    # then the orchestrator failed it and had what was taken released: the next delivery gets
    # the only drone
    assert failed.data["stage"] == "package"
    assert h.published(UndoDelivery, heavy)
    second = await request(h, 2)
    scheduled = await h.wait_for(DroneScheduled, correlation_id=second)
    assert scheduled.data["drone_id"] == "drone-0001"
