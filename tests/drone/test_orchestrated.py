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
from choreograph.demo.events import DeliveryCompleted, DeliveryFailed, DeliveryRequested
from choreograph.testing import Harness
from tests.drone.conftest import calm_knobs, request_body

HarnessFactory = Callable[..., Awaitable[Harness]]


async def test_an_orchestrated_delivery_completes_and_frees_its_drone(
    harness: HarnessFactory,
) -> None:
    # given the orchestrated app with a fleet of one drone
    h = await harness(create_app(calm_knobs(fleet_size=1)))
    body = request_body(1)
    # when a delivery is requested and its flight ends
    await h.publish(DeliveryRequested(**body), correlation_id=body["delivery_id"])
    await h.settle()
    await h.advance(1)
    done = await h.wait_for(DeliveryCompleted, correlation_id=body["delivery_id"])
    await h.settle()
    # then the orchestrator commanded every step, the delivery completed, the drone is free
    # again, the package delivered and the saga completed
    assert done.data["package_id"] == body["package"]["package_id"]
    for command in (CreatePackage, ReserveDrone, ScheduleDelivery, FinishDelivery):
        assert h.published(command, body["delivery_id"]), command.__name__
    drone = await h.state("drone-scheduler", "drone", "drone-0001")
    assert drone == {"status": "free", "delivery": ""}
    package = await h.state("package", "package", body["package"]["package_id"])
    assert package is not None and package["status"] == "delivered"
    saga = await h.state("orchestrator", "saga", body["delivery_id"])
    assert saga is not None and saga["step"] == "completed"


async def test_a_rejected_package_fails_the_delivery_and_releases_the_drone(
    harness: HarnessFactory,
) -> None:
    # given the orchestrated app with a fleet of one drone, and a package too heavy to fly
    h = await harness(create_app(calm_knobs(fleet_size=1)))
    body = request_body(2, weight_kg=40.0)
    # when it is requested
    await h.publish(DeliveryRequested(**body), correlation_id=body["delivery_id"])
    failed = await h.wait_for(DeliveryFailed, correlation_id=body["delivery_id"])
    await h.settle()
    # then the orchestrator failed it and had the drone released
    assert failed.data["stage"] == "package"
    assert h.published(UndoDelivery, body["delivery_id"])
    drone = await h.state("drone-scheduler", "drone", "drone-0001")
    assert drone is not None and drone["status"] == "free"
