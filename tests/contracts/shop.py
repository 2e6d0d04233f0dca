"""A shop choreography with an external participant: ``billing`` (Node.js,
``tests/contracts/node/billing.mjs``) turns orders into invoices; ``shipping`` ships on an
invoice."""

from __future__ import annotations

from collections.abc import Callable

from choreograph import App, Context, Event, External, Service


class OrderPlaced(Event):
    order_id: str
    amount: float


class InvoiceIssued(Event):
    order_id: str
    amount: float


class OrderShipped(Event):
    order_id: str


def build(
    *, with_billing: bool = True, shipped: Callable[[InvoiceIssued, Context], None] | None = None
) -> App:
    shop = Service("shop", emits=[OrderPlaced])
    shipping = Service("shipping")

    @shipping.on(InvoiceIssued, emits=[OrderShipped])
    async def ship(event: InvoiceIssued, ctx: Context) -> OrderShipped:
        if shipped is not None:
            shipped(event, ctx)
        return OrderShipped(order_id=event.order_id)

    billing = External(
        "billing",
        consumes=[OrderPlaced],
        emits=[InvoiceIssued],
        description="invoices, in Node.js",
    )
    return App(
        "shop",
        [shop, shipping],
        terminal=[OrderShipped],
        external=[billing] if with_billing else [],
    )
