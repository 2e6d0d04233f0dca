"""The W2 saga as a choreograph app: payments → stock → shipping, one hop each.

Run one service per process with
``choreograph run --app benchmarks.w2_app:app --service payments --transport … --store …``.
Every event carries ``sent_at``, the client's scheduled publish time, for the latency figure.
"""

from __future__ import annotations

from choreograph import App, Context, Event, Service


class OrderPlaced(Event):
    order_id: str
    customer: str
    amount: float
    sent_at: float


class PaymentCaptured(Event):
    order_id: str
    customer: str
    amount: float
    sent_at: float


class StockReserved(Event):
    order_id: str
    customer: str
    amount: float
    sent_at: float


class OrderCompleted(Event):
    order_id: str
    customer: str
    amount: float
    sent_at: float


payments = Service("payments")
stock = Service("stock")
shipping = Service("shipping")


@payments.on(OrderPlaced, emits=[PaymentCaptured])
async def capture_payment(event: OrderPlaced, ctx: Context) -> PaymentCaptured:
    return PaymentCaptured(
        order_id=event.order_id, customer=event.customer, amount=event.amount,
        sent_at=event.sent_at,
    )  # fmt: skip


@stock.on(PaymentCaptured, emits=[StockReserved])
async def reserve_stock(event: PaymentCaptured, ctx: Context) -> StockReserved:
    return StockReserved(
        order_id=event.order_id, customer=event.customer, amount=event.amount,
        sent_at=event.sent_at,
    )  # fmt: skip


@shipping.on(StockReserved, emits=[OrderCompleted])
async def complete_order(event: StockReserved, ctx: Context) -> OrderCompleted:
    return OrderCompleted(
        order_id=event.order_id, customer=event.customer, amount=event.amount,
        sent_at=event.sent_at,
    )  # fmt: skip


app = App("w2-saga", [payments, stock, shipping], terminal=[OrderCompleted])
SERVICES = ("payments", "stock", "shipping")
