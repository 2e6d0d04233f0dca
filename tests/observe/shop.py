"""A small choreography for the observe tests: an order, stock and payment in parallel, a join.

``order_placed(sku=...)`` picks the path: ``ok``; ``flaky`` (stock fails once, then succeeds);
``declined`` (payment declines: the order fails and stock compensates); ``silent`` (stock never
answers: the transaction is stuck until the join times out, long after the test).
"""

from __future__ import annotations

from choreograph import (
    App,
    Context,
    HandlerFailed,
    JoinTimedOut,
    Parts,
    RetryLater,
    RetryPolicy,
    Service,
)
from choreograph.events import Event


class OrderPlaced(Event):
    order_id: str
    sku: str
    amount: float


class StockReserved(Event):
    order_id: str


class StockUnavailable(Event):
    order_id: str
    reason: str


class PaymentCharged(Event):
    order_id: str


class PaymentDeclined(Event):
    order_id: str
    reason: str


class OrderShipped(Event):
    order_id: str


class OrderFailed(Event):
    order_id: str
    reason: str


FAST_RETRY = RetryPolicy(max_attempts=3, immediate=0, base_delay=0.01, max_delay=0.05)


def build_app(join_within: float = 300.0) -> App:
    shop = Service("shop", emits=[OrderPlaced])
    stock = Service("stock", retry=FAST_RETRY)
    payment = Service("payment")
    shipping = Service("shipping")

    @stock.on(OrderPlaced, emits=[StockReserved, StockUnavailable])
    async def reserve(event: OrderPlaced, ctx: Context) -> StockReserved | None:
        if event.sku == "silent":
            return None
        if event.sku == "flaky" and ctx.attempt == 1:
            raise RetryLater("warehouse busy", delay=0.01)
        await ctx.state.put("reserved", event.order_id, {"sku": event.sku})
        return StockReserved(order_id=event.order_id)

    @stock.compensate(OrderFailed, undoes=reserve)
    async def release(event: OrderFailed, ctx: Context) -> None:
        await ctx.state.delete("reserved", event.order_id)

    @payment.on(OrderPlaced, emits=[PaymentCharged, PaymentDeclined])
    async def charge(event: OrderPlaced, ctx: Context) -> PaymentCharged | PaymentDeclined:
        if event.sku == "declined":
            return PaymentDeclined(order_id=event.order_id, reason="card declined")
        return PaymentCharged(order_id=event.order_id)

    @payment.compensate(OrderFailed, undoes=charge)
    async def refund(event: OrderFailed, ctx: Context) -> None:
        return None

    @shipping.join(
        StockReserved, PaymentCharged, key="order_id", within=join_within, emits=[OrderShipped]
    )
    async def ship(parts: Parts, ctx: Context) -> OrderShipped:
        return OrderShipped(order_id=parts[StockReserved].order_id)

    @shipping.on(PaymentDeclined, emits=[OrderFailed])
    async def declined(event: PaymentDeclined, ctx: Context) -> OrderFailed:
        return OrderFailed(order_id=event.order_id, reason=event.reason)

    @shipping.on(StockUnavailable, emits=[OrderFailed])
    async def no_stock(event: StockUnavailable, ctx: Context) -> OrderFailed:
        return OrderFailed(order_id=event.order_id, reason=event.reason)

    @shipping.on(JoinTimedOut, emits=[OrderFailed])
    async def timed_out(event: JoinTimedOut, ctx: Context) -> OrderFailed:
        return OrderFailed(order_id=event.key, reason="timed out")

    @shipping.on(HandlerFailed, emits=[OrderFailed])
    async def gave_up(event: HandlerFailed, ctx: Context) -> OrderFailed:
        return OrderFailed(order_id=ctx.correlation_id, reason=f"{event.service} gave up")

    return App("shop", [shop, stock, payment, shipping], terminal=[OrderShipped, OrderFailed])


app = build_app()
