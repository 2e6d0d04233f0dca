"""A small delivery choreography in two versions of its contract, for the upgrade tests.

Version 2 of ``DeliveryRequested`` adds a required ``priority`` and version 2 of ``PackageReady``
a required ``dock``; each has an upcaster from version 1. ``build(1, ...)`` is the app before the
upgrade, ``build(2, ...)`` after it: the same services and event types, other classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from choreograph import App, Context, Event, PermanentFailure, Service, upcaster


class RequestedV1(Event):
    event_type: ClassVar[str] = "DeliveryRequested"
    delivery_id: str
    weight_kg: float


class RequestedV2(Event, version=2):
    event_type: ClassVar[str] = "DeliveryRequested"
    delivery_id: str
    weight_kg: float
    priority: str


@upcaster(RequestedV2, from_version=1)
def standard_priority(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "priority": "standard"}


class ReadyV1(Event):
    event_type: ClassVar[str] = "PackageReady"
    delivery_id: str


class ReadyV2(Event, version=2):
    event_type: ClassVar[str] = "PackageReady"
    delivery_id: str
    dock: str


@upcaster(ReadyV2, from_version=1)
def first_dock(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "dock": "A"}


class DeliveryCompleted(Event):
    delivery_id: str


@dataclass(frozen=True)
class Seen:
    """One handling: which version of the code ran, on what."""

    service: str
    code_version: int
    delivery_id: str
    detail: str


Record = Callable[[Seen], None]


def build(version: int, record: Record, *, broken_prefix: str = "") -> App:
    """The app at ``version`` (1 or 2). Version 1's package refuses deliveries whose id starts
    with ``broken_prefix`` (a bug: permanent failure, dead-lettered), version 2 does not."""
    requested = RequestedV1 if version == 1 else RequestedV2
    ready = ReadyV1 if version == 1 else ReadyV2
    ingestion = Service("ingestion", emits=[requested])
    package = Service("package")
    delivery = Service("delivery")
    ledger = Service("ledger")

    @package.on(requested, emits=[ready])
    async def prepare(event: Any, ctx: Context) -> Event:
        if broken_prefix and event.delivery_id.startswith(broken_prefix):
            raise PermanentFailure("version 1 cannot prepare this package")
        record(Seen("package", version, event.delivery_id, getattr(event, "priority", "-")))
        if version == 1:
            return ReadyV1(delivery_id=event.delivery_id)
        return ReadyV2(delivery_id=event.delivery_id, dock="B")

    @delivery.on(ready, emits=[DeliveryCompleted])
    async def fly(event: Any, ctx: Context) -> DeliveryCompleted:
        record(Seen("delivery", version, event.delivery_id, getattr(event, "dock", "-")))
        return DeliveryCompleted(delivery_id=event.delivery_id)

    @ledger.on(DeliveryCompleted)
    async def book(event: DeliveryCompleted, ctx: Context) -> None:
        record(Seen("ledger", version, event.delivery_id, ""))

    return App(
        f"upgrade-v{version}",
        [ingestion, package, delivery, ledger],
        terminal=[DeliveryCompleted],
    )
