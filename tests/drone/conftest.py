"""Factories shared by the drone delivery tests: requests, knobs, an outcome recorder.

Harnesses come from choreograph's own pytest plugin: ``await harness(create_app(knobs))``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from choreograph import Context, Middleware, Outcome, Runtime
from choreograph.demo import tables
from choreograph.demo.events import DeliveryRequested
from choreograph.demo.knobs import Knobs
from choreograph.testing import Harness

#: Knobs that make a run deterministic: no random rejection, no transient error, short flights.
CALM = {"rejection_rate": 0.0, "transient_error_rate": 0.0, "flight_seconds": 0.2,
        "join_timeout": 5.0}  # fmt: skip


def calm_knobs(**overrides: Any) -> Knobs:
    return Knobs(**{**CALM, **overrides})


async def fleet(runtime: Runtime) -> dict[str, dict[str, str]]:
    """drone-scheduler's drones: ``{drone_id: {"status": ..., "delivery": ...}}``."""
    async with runtime.unit_of_work("drone-scheduler") as uow:
        return await tables.drones(uow.session)


async def packages(runtime: Runtime, delivery_id: str | None = None) -> dict[str, dict[str, Any]]:
    """package's packages (of one delivery, or all)."""
    async with runtime.unit_of_work("package") as uow:
        return await tables.packages(uow.session, delivery_id)


def request_body(
    number: int = 1, *, delivery_id: str | None = None, weight_kg: float = 2.0, **extra: Any
) -> dict[str, Any]:
    """A valid POST body (and DeliveryRequested data, with ``delivery_id``)."""
    tag = uuid.uuid4().hex[:8]
    body: dict[str, Any] = {
        "delivery_id": delivery_id or f"d-{number:04d}-{tag}",
        "owner_id": f"owner-{number}",
        "pickup": {"latitude": 47.6, "longitude": -122.3},
        "dropoff": {"latitude": 47.7, "longitude": -122.2},
        "package": {"package_id": f"p-{number:04d}-{tag}", "size": "small", "weight_kg": weight_kg},
    }
    body.update(extra)
    return body


def delivery_requested(number: int = 1, **kwargs: Any) -> DeliveryRequested:
    return DeliveryRequested(**request_body(number, **kwargs))


@dataclass
class Handled:
    service: str
    handler: str
    event_type: str
    event_id: str
    correlation_id: str
    attempt: int
    kind: str
    reason: str = ""


@dataclass
class Recorder(Middleware):
    """Records every settled handling (a passive observer)."""

    handled: list[Handled] = field(default_factory=list)

    def on_outcome(self, ctx: Context, outcome: Outcome) -> None:
        self.handled.append(
            Handled(
                ctx.service,
                ctx.handler,
                ctx.envelope.type,
                ctx.event_id,
                ctx.correlation_id,
                ctx.attempt,
                outcome.kind,
                outcome.failure.reason if outcome.failure else "",
            )
        )

    def of(self, service: str, kind: str | None = None) -> list[Handled]:
        return [h for h in self.handled if h.service == service and kind in (None, h.kind)]


async def request(h: Harness, event: DeliveryRequested) -> str:
    """Publish a delivery request as ingestion would: the delivery id is the correlation id."""
    await h.publish(event, correlation_id=event.delivery_id)
    return event.delivery_id


async def advance_until(
    h: Harness, event_type: type[Any] | str, correlation_id: str, *, within: float
) -> None:
    """Move virtual time in small steps until ``event_type`` of ``correlation_id`` is published
    (at most ``within`` virtual seconds), then let every service handle what follows."""
    waited = 0.0
    while not h.published(event_type, correlation_id) and waited < within:
        await h.advance(0.5)
        waited += 0.5
    await h.settle()
