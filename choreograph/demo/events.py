"""The events of the drone delivery choreography."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from choreograph import Event

Id = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


class Location(BaseModel):
    model_config = ConfigDict(frozen=True)
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)


class PackageInfo(BaseModel):
    model_config = ConfigDict(frozen=True)
    package_id: Id
    size: str = Field(pattern=r"^(small|medium|large)$")
    weight_kg: float = Field(gt=0, le=100)
    tag: str = Field(default="", max_length=200)


class DeliveryRequested(Event):
    delivery_id: Id
    owner_id: Id
    pickup: Location
    dropoff: Location
    package: PackageInfo
    expedited: bool = False


class DeliveryCancelRequested(Event):
    delivery_id: Id
    reason: str = Field(default="cancelled by the customer", max_length=500)


class PackageReady(Event):
    delivery_id: Id
    package_id: Id
    weight_kg: float


class PackageRejected(Event):
    delivery_id: Id
    package_id: Id
    reason: str


class DroneScheduled(Event):
    delivery_id: Id
    drone_id: Id


class DroneUnavailable(Event):
    delivery_id: Id
    reason: str


class DeliveryScheduled(Event):
    delivery_id: Id
    drone_id: Id
    package_id: Id
    flight_seconds: float


class DroneArrived(Event):
    """The simulated flight ended (a durable timer of the delivery service)."""

    delivery_id: Id
    drone_id: Id


class DeliveryCompleted(Event):
    delivery_id: Id
    drone_id: Id
    package_id: Id


class DeliveryFailed(Event):
    """The delivery will not happen. Package and drone-scheduler compensate on it."""

    delivery_id: Id
    reason: str
    stage: str
