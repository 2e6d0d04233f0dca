"""Every path of the drone delivery choreography, in memory on a virtual clock (the Harness)."""

from __future__ import annotations

import pytest

from choreograph import Event, PermanentFailure
from choreograph.demo import create_app, drone_scheduler, package, tables
from choreograph.demo.events import (
    DeliveryCancelRequested,
    DeliveryCompleted,
    DeliveryFailed,
    DeliveryRequested,
    DeliveryScheduled,
    DroneScheduled,
    DroneUnavailable,
    PackageReady,
    PackageRejected,
)
from choreograph.pytest_plugin import HarnessFactory
from choreograph.testing import Harness
from tests.drone.conftest import (
    Recorder,
    advance_until,
    calm_knobs,
    delivery_requested,
    packages,
    request,
)

TERMINAL = ("DeliveryCompleted", "DeliveryFailed")


def outcomes(h: Harness, delivery_id: str) -> list[str]:
    return [e.type for e in h.events if e.type in TERMINAL and e.correlationid == delivery_id]


async def drones(h: Harness) -> dict[str, dict[str, str]]:
    async with h.runtime.unit_of_work("drone-scheduler") as uow:
        return await tables.drones(uow.session)


async def package_status(h: Harness, event: DeliveryRequested) -> str | None:
    doc = (await packages(h.runtime)).get(event.package.package_id)
    return None if doc is None else doc["status"]


# the happy path ---------------------------------------------------------------------------------


async def test_a_delivery_is_scheduled_flown_and_completed(harness: HarnessFactory) -> None:
    # given
    h = await harness(create_app(calm_knobs()))
    event = delivery_requested(1)
    # when
    did = await request(h, event)
    await h.wait_for(DeliveryScheduled, correlation_id=did)
    await h.advance(1)
    completed = await h.wait_for(DeliveryCompleted, correlation_id=did)
    # then
    types = [e.type for e in h.events if e.correlationid == did]
    scheduled_at = types.index("DeliveryScheduled")
    assert {"PackageReady", "DroneScheduled"} <= set(types[:scheduled_at])
    assert types.index("DeliveryCompleted") > scheduled_at
    assert outcomes(h, did) == ["DeliveryCompleted"]
    assert completed.data["package_id"] == event.package.package_id
    assert (await drones(h))[completed.data["drone_id"]] == {"status": "free", "delivery": ""}
    assert await package_status(h, event) == "delivered"
    assert (await h.state("delivery", "delivery", did) or {})["status"] == "completed"
    assert (await h.state("ingestion", "delivery", did) or {})["status"] == "completed"
    assert (await h.state("notification", "sent", did) or {})["outcome"] == "completed"


@pytest.mark.parametrize(
    "first", [PackageReady, DroneScheduled], ids=["package-first", "drone-first"]
)
async def test_the_join_completes_whichever_part_arrives_first(
    harness: HarnessFactory, first: type[Event]
) -> None:
    # given only the delivery service, fed by hand
    h = await harness(create_app(calm_knobs()), services=["delivery"])
    event = delivery_requested(2)
    did = await request(h, event)
    parts: dict[type[Event], Event] = {
        PackageReady: PackageReady(
            delivery_id=did, package_id=event.package.package_id, weight_kg=2.0
        ),
        DroneScheduled: DroneScheduled(delivery_id=did, drone_id="drone-0042"),
    }
    second = DroneScheduled if first is PackageReady else PackageReady
    # when the parts arrive in the given order
    await h.publish(parts[first], correlation_id=did)
    await h.settle()
    assert not h.published(DeliveryScheduled, did)
    await h.publish(parts[second], correlation_id=did)
    # then the delivery is scheduled once, with both parts
    scheduled = await h.wait_for(DeliveryScheduled, correlation_id=did)
    assert scheduled.data["drone_id"] == "drone-0042"
    assert scheduled.data["package_id"] == event.package.package_id
    await h.advance(1)
    assert outcomes(h, did) == ["DeliveryCompleted"]


# failures and compensations ---------------------------------------------------------------------


async def test_a_rejected_package_fails_the_delivery_and_frees_the_drone(
    harness: HarnessFactory,
) -> None:
    # given a package over the weight limit
    h = await harness(create_app(calm_knobs()))
    event = delivery_requested(3, weight_kg=40.0)
    # when
    did = await request(h, event)
    failed = await h.wait_for(DeliveryFailed, correlation_id=did)
    await h.advance(1)
    # then
    assert h.published(PackageRejected, did)
    assert failed.data["reason"].startswith("package rejected: package weighs 40.0 kg")
    assert failed.data["stage"] == "package"
    assert outcomes(h, did) == ["DeliveryFailed"]
    assert not h.published(DeliveryScheduled, did)
    assert await package_status(h, event) == "rejected"
    fleet = await drones(h)
    assert fleet, "the drone-scheduler created its fleet"
    assert all(d == {"status": "free", "delivery": ""} for d in fleet.values())


async def test_a_busy_fleet_makes_the_drone_unavailable_and_releases_the_package(
    harness: HarnessFactory,
) -> None:
    # given a fleet of one drone, busy with a long first flight
    h = await harness(create_app(calm_knobs(fleet_size=1, flight_seconds=1000, join_timeout=60)))
    first = await request(h, delivery_requested(4))
    await h.wait_for(DeliveryScheduled, correlation_id=first)
    # when a second delivery waits for a drone longer than the fleet wait allows
    second_event = delivery_requested(5)
    second = await request(h, second_event)
    await advance_until(h, DeliveryFailed, second, within=20)
    # then it fails for want of a drone, its package is released, the first keeps its drone
    unavailable = await h.wait_for(DroneUnavailable, correlation_id=second)
    assert unavailable.data["reason"] == "all 1 drones are busy"
    failed = await h.wait_for(DeliveryFailed, correlation_id=second)
    assert failed.data["reason"] == "no drone: all 1 drones are busy"
    assert await package_status(h, second_event) == "released"
    assert await drones(h) == {"drone-0001": {"status": "reserved", "delivery": first}}
    assert outcomes(h, first) == []


async def test_a_cancel_before_scheduling_fails_the_delivery_and_compensates_both(
    harness: HarnessFactory,
) -> None:
    # given a delivery whose drone answers late, so it is not scheduled yet
    h = await harness(
        create_app(calm_knobs(slow_drone_rate=1.0, slow_drone_seconds=2, join_timeout=5))
    )
    event = delivery_requested(6)
    did = await request(h, event)
    await h.wait_for(PackageReady, correlation_id=did)
    assert (await drones(h))["drone-0001"]["delivery"] == did
    # when the customer cancels
    await h.publish(DeliveryCancelRequested(delivery_id=did, reason="changed my mind"),
                    correlation_id=did)  # fmt: skip
    failed = await h.wait_for(DeliveryFailed, correlation_id=did)
    await h.advance(3)  # the late DroneScheduled arrives and is ignored
    # then
    assert failed.data["reason"] == "cancelled: changed my mind"
    assert failed.data["stage"] == "cancel"
    assert await package_status(h, event) == "released"
    assert all(d["status"] == "free" for d in (await drones(h)).values())
    assert h.published(DroneScheduled, did), "the late drone did answer"
    assert not h.published(DeliveryScheduled, did)
    assert outcomes(h, did) == ["DeliveryFailed"]


async def test_a_silent_drone_scheduler_times_the_join_out(harness: HarnessFactory) -> None:
    # given a drone-scheduler that consumes requests and never answers
    h = await harness(create_app(calm_knobs(silent_drone_scheduler=True, join_timeout=2)))
    event = delivery_requested(7)
    did = await request(h, event)
    await h.wait_for(PackageReady, correlation_id=did)
    # when the join's deadline passes on the virtual clock
    await h.advance(1.5)
    assert not h.published(DeliveryFailed, did), "the deadline has not passed yet"
    await h.advance(1)
    # then
    failed = await h.wait_for(DeliveryFailed, correlation_id=did)
    assert failed.data["reason"] == "timed out waiting for DroneScheduled"
    assert failed.data["stage"] == "scheduling"
    assert await package_status(h, event) == "released"
    assert outcomes(h, did) == ["DeliveryFailed"]


async def test_a_drone_slower_than_the_join_timeout_fails_and_its_late_answer_is_ignored(
    harness: HarnessFactory,
) -> None:
    # given every drone answers after 3 s, the join waits 1 s
    recorder = Recorder()
    h = await harness(
        create_app(calm_knobs(slow_drone_rate=1.0, slow_drone_seconds=3, join_timeout=1)),
        middleware=[recorder],
    )
    event = delivery_requested(8)
    did = await request(h, event)
    # when
    await h.advance(1.5)
    failed = await h.wait_for(DeliveryFailed, correlation_id=did)
    assert not h.published(DroneScheduled, did)
    await h.advance(3)
    # then the drone was freed by the compensation, and stays free after the late answer
    assert failed.data["reason"] == "timed out waiting for DroneScheduled"
    late = await h.wait_for(DroneScheduled, correlation_id=did)
    assert all(d["status"] == "free" for d in (await drones(h)).values())
    assert await package_status(h, event) == "released"
    join = await h.state("delivery", "_join:schedule_delivery", did) or {}
    assert join["status"] == "expired"
    await h.settle()
    # the answer came after the delivery ended: late, it never reached the join
    assert [x.kind for x in recorder.of("delivery") if x.event_id == late.id] == ["late"]
    assert not join.get("late")
    assert not h.published(DeliveryScheduled, did)
    assert outcomes(h, did) == ["DeliveryFailed"]


async def test_transient_errors_are_retried_until_the_delivery_completes(
    harness: HarnessFactory,
) -> None:
    # given the first two attempts of package and drone-scheduler always fail
    recorder = Recorder()
    h = await harness(create_app(calm_knobs(transient_error_rate=1.0)), middleware=[recorder])
    event = delivery_requested(9)
    # when
    did = await request(h, event)
    await h.advance(2)
    # then
    await h.wait_for(DeliveryCompleted, correlation_id=did)
    for service in ("package", "drone-scheduler"):
        tries = [
            (r.attempt, r.kind) for r in recorder.of(service) if r.event_type == "DeliveryRequested"
        ]
        assert tries == [(1, "retry"), (2, "retry"), (3, "done")], service
    assert outcomes(h, did) == ["DeliveryCompleted"]
    assert not await h.dead_letters()


@pytest.mark.parametrize(
    ("module", "service", "compensated"),
    [(package, "package", "drone"), (drone_scheduler, "drone-scheduler", "package")],
    ids=["package", "drone-scheduler"],
)
@pytest.mark.parametrize("error", [RuntimeError("boom"), PermanentFailure("boom")],
                         ids=["raises", "permanent"])  # fmt: skip
async def test_a_handler_that_always_raises_is_dead_lettered_and_the_delivery_compensated(
    harness: HarnessFactory,
    monkeypatch: pytest.MonkeyPatch,
    module: object,
    service: str,
    compensated: str,
    error: Exception,
) -> None:
    # given a handler that raises on every attempt
    def always_fail(*args: object) -> None:
        raise error

    monkeypatch.setattr(module, "maybe_fail", always_fail)
    h = await harness(create_app(calm_knobs(join_timeout=60)))
    event = delivery_requested(10)
    # when
    did = await request(h, event)
    await advance_until(h, DeliveryFailed, did, within=15)
    # then the event is dead-lettered with its reason, and the failure is announced
    (dead,) = await h.dead_letters()
    assert dead.group == service
    assert dead.message.topic == "DeliveryRequested"
    assert dead.failure.error == "boom"
    if isinstance(error, PermanentFailure):
        assert (dead.failure.reason, dead.attempts) == ("permanent failure", 1)
    else:
        assert dead.failure.reason == "attempts exhausted"
        assert dead.attempts == (8 if service == "drone-scheduler" else 5)
    announced = await h.wait_for("choreograph.HandlerFailed", correlation_id=did)
    assert announced.data["service"] == service
    failed = await h.wait_for(DeliveryFailed, correlation_id=did)
    assert failed.data["reason"] == f"{service} gave up on DeliveryRequested: boom"
    assert outcomes(h, did) == ["DeliveryFailed"]
    # and the other participant compensated
    if compensated == "drone":
        assert all(d["status"] == "free" for d in (await drones(h)).values())
    else:
        assert await package_status(h, event) == "released"
