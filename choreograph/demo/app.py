"""The drone delivery app: five services, two of them in parallel, a join, compensations."""

from __future__ import annotations

from choreograph import App
from choreograph.demo import delivery, drone_scheduler, ingestion, notification, package
from choreograph.demo.events import DeliveryCompleted, DeliveryFailed
from choreograph.demo.knobs import Knobs


def create_app(knobs: Knobs | None = None, *, with_notification: bool = True) -> App:
    """Build the app; knobs default to the ``DRONE_*`` environment variables."""
    knobs = knobs or Knobs.from_env()
    services = [
        ingestion.build_service(),
        package.build(knobs),
        drone_scheduler.build(knobs),
        delivery.build(knobs),
    ]
    if with_notification:
        services.append(notification.build())
    return App(
        "drone-delivery",
        services,
        terminal=[DeliveryCompleted, DeliveryFailed],
        description="Drone delivery: the reference choreography of choreograph.",
    )
