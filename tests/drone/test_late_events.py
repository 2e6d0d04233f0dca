"""Every order of arrival of a delivery's events at package and drone-scheduler leaves nothing
held: no drone reserved and no package ready for a delivery that failed, and completed deliveries
untouched by what arrives after them.

The runtime's late-event rule does this (no tombstones in the services): a request that arrives
after its delivery ended is late and never runs; a request that ran before the failure is undone
by the compensation.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from choreograph import Runtime, WorkerSettings
from choreograph.demo import create_app
from choreograph.demo.drone_scheduler import FLEET_WAIT
from choreograph.demo.events import (
    DeliveryCompleted,
    DeliveryFailed,
    DeliveryRequested,
    DroneScheduled,
)
from choreograph.envelope import Envelope, encode, new_envelope
from choreograph.events import Event
from choreograph.pytest_plugin import HarnessFactory
from choreograph.transport import Message
from choreograph.transports.memory import MemoryTransport
from tests.drone.conftest import Recorder, calm_knobs, delivery_requested, fleet, packages
from tests.stores.conftest import PG_URL, drop_schemas
from tests.support.brokers import POSTGRES

SERVICES = ("package", "drone-scheduler")


@dataclass(frozen=True)
class Arrival:
    """One copy of an event reaching the service; copies of one envelope share its id."""

    label: str
    envelope: Envelope


def envelope(event: Event, delivery_id: str) -> Envelope:
    return new_envelope(
        event.event_type, event.to_data(), source="test", correlation_id=delivery_id
    )


def orders(labels: list[str]) -> Iterator[tuple[str, ...]]:
    """Every distinct order of ``labels`` (a multiset: copies of one label are interchangeable)."""
    return iter(sorted(set(itertools.permutations(labels))))


def events_of(kind: str, number: int) -> tuple[str, dict[str, Envelope]]:
    """A delivery that ends as ``kind``; its request ``R``, a second request ``R2`` for the same
    delivery (a new event id, as from a client retrying), and its terminal event ``F`` or ``C``."""
    request = delivery_requested(number, weight_kg=60.0 if kind == "rejected" else 2.0)
    did = request.delivery_id
    again = DeliveryRequested(**request.to_data())
    terminal: Event
    if kind == "completed":
        terminal = DeliveryCompleted(
            delivery_id=did, drone_id="drone-0001", package_id=request.package.package_id
        )
    else:
        stage = {"failed": "scheduling", "cancelled": "cancel", "rejected": "package"}[kind]
        terminal = DeliveryFailed(delivery_id=did, reason=f"{kind} in test", stage=stage)
    end = "C" if kind == "completed" else "F"
    return did, {
        "R": envelope(request, did),
        "R2": envelope(again, did),
        end: envelope(terminal, did),
    }


#: Per scenario, the copies that arrive: duplicates of the request and of the terminal event
#: (redeliveries), and a second request with its own id.
SCENARIOS = {
    "failed": ["R", "R", "R2", "F", "F"],
    "cancelled": ["R", "R2", "F", "F"],
    "rejected": ["R", "R", "F", "F"],
    "completed": ["R", "R", "R2", "C", "C"],
}


def causal(kind: str, order: tuple[str, ...]) -> bool:
    """A delivery completes only after this very service answered one of its requests."""
    if kind != "completed":
        return True
    return order.index("C") > min(order.index(r) for r in ("R", "R2"))


@dataclass
class Case:
    kind: str
    order: tuple[str, ...]
    delivery_id: str
    arrivals: list[Arrival]


def all_cases() -> list[Case]:
    cases: list[Case] = []
    number = 0
    for kind, labels in SCENARIOS.items():
        for order in orders(labels):
            if not causal(kind, order):
                continue
            number += 1
            did, envelopes = events_of(kind, number)
            cases.append(Case(kind, order, did, [Arrival(x, envelopes[x]) for x in order]))
    return cases


async def held(runtime: Runtime, service: str, delivery_id: str) -> list[dict[str, Any]]:
    """What ``service`` still holds for the delivery: reserved drones, packages not released."""
    if service == "drone-scheduler":
        return [d for d in (await fleet(runtime)).values() if d["delivery"] == delivery_id]
    return list((await packages(runtime, delivery_id)).values())


@pytest.fixture(
    params=["memory", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def store_url(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[str]:
    """The services' stores: SQLite in memory, or PostgreSQL (schemas dropped afterwards)."""
    if request.param == "memory":
        yield "memory://"
        return
    POSTGRES.require()
    yield f"{PG_URL}?schema={namespace}_{{service}}"
    await drop_schemas(namespace)


@pytest.mark.parametrize("service", SERVICES)
async def test_every_order_of_arrival_leaves_nothing_held(service: str, store_url: str) -> None:
    # given the service alone, and every order of arrival of every scenario, each its delivery
    recorder = Recorder()
    transport = MemoryTransport()
    cases = all_cases()
    assert len(cases) == 66  # the distinct orders of the scenarios above that can happen
    arrivals = [a for case in cases for a in case.arrivals]
    runtime = Runtime(
        create_app(calm_knobs()),
        transport=transport,
        store=store_url,
        services=[service],
        middleware=[recorder],
        settings=WorkerSettings(concurrency=1),  # one lane: handled in the order of arrival
    )
    async with runtime:
        # when each case's copies are delivered in its order (one FIFO queue)
        for arrival in arrivals:
            e = arrival.envelope
            await transport.publish([Message(e.id, e.type, encode(e))])
        for _ in range(6000):  # a hang guard only: every arrival settles once (no retries here)
            if len(recorder.of(service)) >= len(arrivals):
                break
            await asyncio.sleep(0.01)
        # then
        assert len(recorder.of(service)) == len(arrivals)
        for case in cases:
            where = f"{service}, {case.kind} delivery, arrivals {' '.join(case.order)}"
            seen = [x for x in recorder.of(service) if x.correlation_id == case.delivery_id]
            assert [x.event_id for x in seen] == [a.envelope.id for a in case.arrivals], where
            after_end = seen[case.order.index("F" if "F" in case.order else "C") + 1 :]
            ran_after_end = [x for x in after_end if x.event_type == "DeliveryRequested"]
            assert all(x.kind in ("late", "duplicate") for x in ran_after_end), where
            holding = await held(runtime, service, case.delivery_id)
            if case.kind == "completed":
                if service == "package":
                    assert [d["status"] for d in holding] == ["delivered"], where
                else:
                    assert holding == [], where  # the drone came back and was not taken again
            elif service == "package":
                assert all(d["status"] in ("released", "rejected") for d in holding), where
            else:
                assert holding == [], where


def requests(recorder: Recorder, delivery_id: str) -> list[str]:
    """The outcomes of drone-scheduler's handlings of the delivery's request, in order."""
    return [
        x.kind
        for x in recorder.of("drone-scheduler")
        if x.event_type == "DeliveryRequested" and x.correlation_id == delivery_id
    ]


async def test_a_request_retrying_for_a_busy_fleet_never_takes_a_drone_once_failed(
    harness: HarnessFactory,
) -> None:
    # given a fleet of one drone, held by a delivery in flight
    recorder = Recorder()
    h = await harness(
        create_app(calm_knobs(fleet_size=1)), services=["drone-scheduler"], middleware=[recorder]
    )
    first = delivery_requested(1)
    await h.publish(first, correlation_id=first.delivery_id)
    await h.wait_for(DroneScheduled, correlation_id=first.delivery_id)
    # and a second request that waits (retries) for a drone
    second = delivery_requested(2)
    await h.publish(second, correlation_id=second.delivery_id)
    await h.settle()
    assert requests(recorder, second.delivery_id) == ["retry"]
    # when the second delivery fails (e.g. cancelled) while its request still waits, and then
    # the first one completes and frees the drone
    failed = DeliveryFailed(delivery_id=second.delivery_id, reason="cancelled", stage="cancel")
    await h.publish(failed, correlation_id=second.delivery_id)
    completed = DeliveryCompleted(
        delivery_id=first.delivery_id, drone_id="drone-0001", package_id=first.package.package_id
    )
    await h.publish(completed, correlation_id=first.delivery_id)
    await h.advance(FLEET_WAIT.max_delay * 2)
    # then the waiting request's next attempt is late: the free drone is not taken
    attempts = requests(recorder, second.delivery_id)
    assert attempts[-1] == "late" and "done" not in attempts
    assert await held(h.runtime, "drone-scheduler", second.delivery_id) == []
    assert (await fleet(h.runtime))["drone-0001"] == {"status": "free", "delivery": ""}
    assert not h.published(DroneScheduled, second.delivery_id)
