"""Handling semantics on the in-memory bus: emission, correlation, retries, dead letters."""

from __future__ import annotations

import orjson
import pytest

from choreograph import (
    App,
    Context,
    Event,
    HandlerFailed,
    PermanentFailure,
    RetryLater,
    RetryPolicy,
    Service,
)
from choreograph.envelope import MAX_EVENT_BYTES
from choreograph.testing import Harness
from choreograph.transport import Message


class Order(Event):
    order_id: str
    amount: int


class Paid(Event):
    order_id: str


class Shipped(Event):
    order_id: str


class Stray(Event):
    pass


def shop(behaviour: dict[str, object] | None = None) -> App:
    """payment reacts to Order -> Paid; shipping reacts to Paid -> Shipped."""
    behaviour = behaviour if behaviour is not None else {}
    calls: dict[str, int] = behaviour.setdefault("calls", {})  # type: ignore[assignment]
    payment = Service("payment", retry=RetryPolicy(max_attempts=3, immediate=1, base_delay=1.0))
    shipping = Service("shipping")

    @payment.on(Order, emits=[Paid])
    async def charge(event: Order, ctx: Context) -> Paid | Shipped:
        calls[event.order_id] = calls.get(event.order_id, 0) + 1
        mode = behaviour.get(event.order_id)
        if mode == "flaky" and ctx.attempt < 3:
            raise ConnectionError("card processor unreachable")
        if mode == "broken":
            raise ValueError("always broken")
        if mode == "permanent":
            raise PermanentFailure("card declined")
        if mode == "later":
            raise RetryLater("busy", delay=7.0)
        if mode == "undeclared":
            return Shipped(order_id=event.order_id)
        await ctx.state.put("charge", event.order_id, {"amount": event.amount})
        return Paid(order_id=event.order_id)

    @shipping.on(Paid, emits=[Shipped])
    async def ship(event: Paid, ctx: Context) -> Shipped:
        return Shipped(order_id=event.order_id)

    @shipping.on(HandlerFailed)
    async def note_failure(event: HandlerFailed, ctx: Context) -> None:
        await ctx.state.put("failure", ctx.correlation_id, {"reason": event.reason})

    return App("shop", [payment, shipping], terminal=[Shipped])


async def test_events_flow_with_correlation_and_causation() -> None:
    async with Harness(shop()) as h:
        order = await h.publish(Order(order_id="o1", amount=5), correlation_id="tx-1")
        shipped = await h.wait_for(Shipped, correlation_id="tx-1")
        paid = h.published(Paid, "tx-1")[0]
        assert paid.causationid == order.id
        assert shipped.causationid == paid.id
        assert {e.correlationid for e in h.events} == {"tx-1"}
        assert paid.source == "payment"
        assert await h.state("payment", "charge", "o1") == {"amount": 5}


async def test_transient_failures_are_retried_with_backoff_then_succeed() -> None:
    behaviour: dict[str, object] = {"o2": "flaky"}
    async with Harness(shop(behaviour)) as h:
        await h.publish(Order(order_id="o2", amount=1), correlation_id="tx-2")
        await h.settle()
        assert not h.published(Paid)  # attempt 1 failed, attempt 2 (immediate) failed
        await h.advance(3)  # the backoff before attempt 3
        await h.wait_for(Shipped, correlation_id="tx-2")
        assert behaviour["calls"] == {"o2": 3}
        assert await h.dead_letters() == []


async def test_exhausted_attempts_dead_letter_and_announce_the_failure() -> None:
    async with Harness(shop({"o3": "broken"})) as h:
        await h.publish(Order(order_id="o3", amount=1), correlation_id="tx-3")
        await h.advance(10)
        failed = await h.wait_for(HandlerFailed, correlation_id="tx-3")
        assert failed.data["service"] == "payment"
        assert failed.data["handler"] == "charge"
        assert failed.data["attempts"] == 3
        assert failed.data["error_type"] == "ValueError"
        assert failed.data["data"] == {"order_id": "o3", "amount": 1}
        (dead,) = await h.dead_letters("payment")
        assert dead.failure.reason == "attempts exhausted"
        assert dead.failure.error == "always broken"
        assert dead.attempts == 3
        await h.settle()
        assert await h.state("shipping", "failure", "tx-3") == {"reason": "always broken"}


async def test_permanent_failure_is_not_retried() -> None:
    behaviour: dict[str, object] = {"o4": "permanent"}
    async with Harness(shop(behaviour)) as h:
        await h.publish(Order(order_id="o4", amount=1), correlation_id="tx-4")
        await h.wait_for(HandlerFailed, correlation_id="tx-4")
        (dead,) = await h.dead_letters("payment")
        assert dead.failure.reason == "permanent failure"
        assert dead.attempts == 1
        assert behaviour["calls"] == {"o4": 1}


async def test_retry_later_uses_its_own_delay() -> None:
    behaviour: dict[str, object] = {"o5": "later"}
    async with Harness(shop(behaviour)) as h:
        await h.publish(Order(order_id="o5", amount=1))
        await h.settle()
        await h.advance(6)
        assert behaviour["calls"] == {"o5": 1}
        await h.advance(2)
        assert behaviour["calls"] == {"o5": 2}


async def test_emitting_an_undeclared_event_is_a_permanent_failure() -> None:
    async with Harness(shop({"o6": "undeclared"})) as h:
        await h.publish(Order(order_id="o6", amount=1), correlation_id="tx-6")
        await h.wait_for(HandlerFailed, correlation_id="tx-6")
        (dead,) = await h.dead_letters("payment")
        assert "does not list in emits" in dead.failure.error
        assert not h.published(Shipped)


def raw(body: bytes, topic: str = "Order") -> Message:
    return Message(id=f"raw-{len(body)}-{topic}", topic=topic, body=body)


def cloud_event(type_: str, data: object) -> bytes:
    doc = {"specversion": "1.0", "id": f"id-{type_}-{len(str(data))}", "source": "t", "type": type_}
    return orjson.dumps({**doc, "data": data})


@pytest.mark.parametrize(
    ("body", "topic", "reason", "says"),
    [
        (b"{oops", "Order", "malformed envelope", "not JSON"),
        (cloud_event("Order", {"order_id": "x"}), "Order", "schema violation", "amount"),
        (cloud_event("Stray", {}), "Order", "topic and type disagree", "'Stray' came on topic"),
        (
            cloud_event("Order", {"order_id": "x", "amount": 1, "pad": "x" * MAX_EVENT_BYTES}),
            "Order",
            "payload too large",
            "limit",
        ),
    ],
)
async def test_poison_messages_dead_letter_with_their_reason_and_the_rest_flows(
    body: bytes, topic: str, reason: str, says: str
) -> None:
    async with Harness(shop()) as h:
        h.transport.max_message_bytes = 2 * MAX_EVENT_BYTES  # let the oversized one on the bus
        await h.transport.publish([raw(body, topic)])
        await h.publish(Order(order_id="ok", amount=1), correlation_id="tx-ok")
        await h.wait_for(Shipped, correlation_id="tx-ok")
        (dead,) = await h.dead_letters("payment")
        assert dead.failure.reason == reason
        assert says in dead.failure.error
        assert dead.message.body == body


async def test_replay_sends_a_fixed_message_back_to_its_group_only() -> None:
    behaviour: dict[str, object] = {"o7": "permanent"}
    async with Harness(shop(behaviour)) as h:
        await h.publish(Order(order_id="o7", amount=1), correlation_id="tx-7")
        await h.wait_for(HandlerFailed, correlation_id="tx-7")
        (dead,) = await h.dead_letters("payment")
        behaviour["o7"] = "fixed"
        assert await h.transport.replay(dead.id)
        await h.wait_for(Shipped, correlation_id="tx-7")
        assert await h.dead_letters() == []
        assert behaviour["calls"] == {"o7": 2}


async def test_a_redelivered_event_does_not_run_its_handler_twice() -> None:
    behaviour: dict[str, object] = {}
    async with Harness(shop(behaviour)) as h:
        order = await h.publish(Order(order_id="o8", amount=1), correlation_id="tx-8")
        await h.wait_for(Shipped, correlation_id="tx-8")
        await h.transport.publish([Message(order.id, "Order", orjson.dumps(order.to_dict()))])
        await h.settle()
        assert behaviour["calls"] == {"o8": 1}
        assert len(h.published(Paid)) == 1


async def test_a_service_can_be_added_and_removed_while_the_others_run() -> None:
    auditor = Service("auditor")
    audited: list[str] = []

    @auditor.on(Shipped)
    async def audit(event: Shipped, ctx: Context) -> None:
        audited.append(event.order_id)

    async with Harness(shop()) as h:
        await h.publish(Order(order_id="before", amount=1))
        await h.wait_for(Shipped, where=lambda e: e.data["order_id"] == "before")
        await h.runtime.add_service(auditor)
        await h.publish(Order(order_id="during", amount=1))
        await h.wait_for(Shipped, where=lambda e: e.data["order_id"] == "during")
        await h.settle()
        await h.runtime.remove_service("auditor")
        await h.publish(Order(order_id="after", amount=1))
        await h.wait_for(Shipped, where=lambda e: e.data["order_id"] == "after")
        await h.settle()
        assert audited == ["during"]
        # its group keeps what arrived while it was away
        assert await h.transport.lag("auditor") == 1
