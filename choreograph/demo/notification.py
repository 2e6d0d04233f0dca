"""notification: an "unknown subscriber" of the outcome of deliveries.

It can be added to or removed from a running system without touching any other service.
"""

from __future__ import annotations

import logging

from choreograph import Context, Service
from choreograph.demo.events import DeliveryCompleted, DeliveryFailed

log = logging.getLogger("drone_delivery.notification")


def build() -> Service:
    notification = Service("notification", description="Tells customers how their delivery went.")

    @notification.on(DeliveryCompleted)
    async def notify_completed(event: DeliveryCompleted, ctx: Context) -> None:
        await ctx.state.put("sent", event.delivery_id, {"outcome": "completed"})
        log.info("delivery %s arrived with %s", event.delivery_id, event.drone_id)

    @notification.on(DeliveryFailed)
    async def notify_failed(event: DeliveryFailed, ctx: Context) -> None:
        await ctx.state.put(
            "sent", event.delivery_id, {"outcome": "failed", "reason": event.reason}
        )
        log.info("delivery %s failed: %s", event.delivery_id, event.reason)

    return notification
