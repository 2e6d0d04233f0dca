"""Harness.call runs one service's handling of one event alone, against a state the test gives."""

from __future__ import annotations

import pytest

from choreograph import (
    App,
    ConfigurationError,
    Context,
    DeadlineExpired,
    Event,
    HandlerFailed,
    RetryPolicy,
    Service,
)
from choreograph.demo import create_app
from choreograph.demo.events import (
    DeliveryCancelRequested,
    DeliveryFailed,
    DeliveryScheduled,
    DroneArrived,
    DroneScheduled,
    PackageReady,
    PackageRejected,
)
from choreograph.pytest_plugin import HarnessFactory
from choreograph.testing import Harness
from tests.drone.conftest import calm_knobs, delivery_requested


@pytest.fixture
def drone_app() -> App:
    return create_app(calm_knobs(flight_seconds=3.0, join_timeout=5.0))


async def test_call_returns_the_typed_events_emitted_and_the_documents_stored(
    harness: HarnessFactory, drone_app: App
) -> None:
    # given the delivery service, on its own
    h = await harness(drone_app, services=[])
    did = "d-rejected"
    rejected = PackageRejected(delivery_id=did, package_id="p1", reason="too heavy")
    # when
    result = await h.call("delivery", rejected, correlation_id=did)
    # then
    assert result.outcome == "done"
    assert result.emitted == [
        DeliveryFailed(delivery_id=did, reason="package rejected: too heavy", stage="package")
    ]
    assert result.envelopes[0].correlationid == did
    assert result.envelopes[0].causationid == result.envelope.id
    assert result.stored("delivery", did) == {
        "status": "failed",
        "reason": "package rejected: too heavy",
    }
    assert h.events == []  # nothing was published on the harness' bus


async def test_call_starts_from_the_state_given(harness: HarnessFactory, drone_app: App) -> None:
    # given a delivery already in flight
    h = await harness(drone_app, services=[])
    did = "d-flying"
    state = {"delivery": {did: {"status": "in_flight", "drone_id": "drone-7"}}}
    # when a cancel arrives
    cancel = DeliveryCancelRequested(delivery_id=did, reason="changed my mind")
    result = await h.call("delivery", cancel, state=state, correlation_id=did)
    # then it is too late to fail it: nothing is emitted and the document is as it was
    assert result.outcome == "done"
    assert result.emitted == []
    assert result.stored("delivery", did) == state["delivery"][did]


async def test_call_runs_a_handler_on_its_tables(harness: HarnessFactory, drone_app: App) -> None:
    # given drone-scheduler, whose fleet is a table (created in the call's fresh store)
    h = await harness(drone_app, services=[])
    request = delivery_requested(2)
    # when a request arrives
    result = await h.call("drone-scheduler", request, correlation_id=request.delivery_id)
    # then it reserves the first drone of the fleet
    assert result.outcome == "done"
    assert result.emitted == [
        DroneScheduled(delivery_id=request.delivery_id, drone_id="drone-0001")
    ]


class Ordered(Event):
    order: str


class OrderCancelled(Event):
    order: str


def stock_app() -> App:
    stock = Service("stock")

    @stock.on(Ordered)
    async def reserve(event: Ordered, ctx: Context) -> None:
        await ctx.state.put("reserved", event.order, {"status": "held"})

    @stock.compensate(OrderCancelled, undoes=reserve)
    async def release(event: OrderCancelled, ctx: Context) -> None:
        doc = await ctx.state.get("reserved", event.order)
        if doc is not None:
            await ctx.state.put("reserved", event.order, {"status": "released"})

    return App("stock", [stock], terminal=[OrderCancelled])


async def test_a_compensation_runs_against_the_work_it_undoes() -> None:
    # given stock held for an order
    h = Harness(stock_app())
    held = await h.call("stock", Ordered(order="o1"), correlation_id="o1")
    # when the order is cancelled, with the state the first handling left
    result = await h.call(
        "stock", OrderCancelled(order="o1"), state=held.state, correlation_id="o1"
    )
    # then the stock is released
    assert result.stored("reserved", "o1") == {"status": "released"}


async def test_a_join_completes_over_two_chained_calls_and_emits_later(
    harness: HarnessFactory, drone_app: App
) -> None:
    # given the delivery service and the two parts of its join
    h = await harness(drone_app, services=[])
    did = "d-join"
    package = PackageReady(delivery_id=did, package_id="p1", weight_kg=1.0)
    drone = DroneScheduled(delivery_id=did, drone_id="drone-7")
    # when the first part arrives
    first = await h.call("delivery", package, correlation_id=did)
    # then nothing is emitted yet and the join's timeout is pending
    assert first.emitted == []
    assert [(t.name, t.key, t.due_in) for t in first.timers] == [
        ("join:schedule_delivery", did, 5.0)
    ]
    # when the second part arrives on the state the first left
    second = await h.call("delivery", drone, state=first.state, correlation_id=did)
    # then the delivery is scheduled, its arrival emitted later, and the timeout gone
    assert [type(e) for e in second.emitted] == [DeliveryScheduled]
    assert second.later == [(DroneArrived(delivery_id=did, drone_id="drone-7"), 3.0)]
    assert second.timers == []
    assert (second.stored("delivery", did) or {})["status"] == "in_flight"


class Boom(Event):
    n: int


class Done(Event):
    n: int


def failing_app() -> App:
    svc = Service("calc", retry=RetryPolicy(max_attempts=3, immediate=0, jitter=0.0))

    @svc.on(Boom, emits=[Done])
    async def divide(event: Boom, ctx: Context) -> Done:
        await ctx.state.put("tried", str(event.n), {"attempt": ctx.attempt})
        return Done(n=10 // event.n)

    return App("calc", [svc])


@pytest.mark.parametrize(("attempt", "outcome"), [(1, "retry"), (3, "dead_letter")])
async def test_a_failing_handler_retries_then_gives_up_with_its_state_rolled_back(
    attempt: int, outcome: str
) -> None:
    # given a handler that divides by zero (harness not started: call needs no running service)
    h = Harness(failing_app())
    # when
    result = await h.call("calc", Boom(n=0), attempt=attempt)
    # then
    assert result.outcome == outcome
    assert result.failure is not None
    assert result.failure.error_type == "ZeroDivisionError"
    assert result.state == {}  # the handler's write was rolled back with it
    announced = [e for e in result.emitted if isinstance(e, HandlerFailed)]
    assert len(announced) == (1 if outcome == "dead_letter" else 0)


async def test_an_event_the_service_does_not_react_to_is_refused_clearly() -> None:
    h = Harness(failing_app())
    with pytest.raises(ConfigurationError, match="calc does not react to PackageRejected"):
        await h.call("calc", PackageRejected(delivery_id="d", package_id="p", reason="r"))


async def test_expire_runs_a_join_timeout_on_the_parts_a_call_left(
    harness: HarnessFactory, drone_app: App
) -> None:
    # given the delivery service holding one part of its join
    h = await harness(drone_app, services=[])
    did = "d-expire"
    half = await h.call(
        "delivery",
        PackageReady(delivery_id=did, package_id="p1", weight_kg=1.0),
        correlation_id=did,
    )
    # when the join's timeout expires
    result = await h.expire(
        "delivery", "schedule_delivery", key=did, correlation_id=did, state=half.state
    )
    # then its on_timeout fails the delivery, naming the missing part, and the join is over
    assert result.outcome == "done"
    assert [type(e) for e in result.emitted] == [DeliveryFailed]
    failed = result.emitted[0]
    assert isinstance(failed, DeliveryFailed)
    assert "DroneScheduled" in failed.reason
    assert (result.stored("_join:schedule_delivery", did) or {})["status"] == "expired"


class Asked(Event):
    question: str


class Unanswered(Event):
    question: str


def deadline_app() -> App:
    svc = Service("desk")

    @svc.deadline(starts_on=Asked, expect=[Done], within=60, emits=[Unanswered])
    async def no_answer(expired: DeadlineExpired, ctx: Context) -> Unanswered:
        asked = await ctx.state.get("asked", expired.key) or {}
        return Unanswered(question=str(asked.get("question", "?")))

    return App("desk", [svc])


async def test_expire_runs_a_deadline_against_the_state_given() -> None:
    # given a desk that remembers a question of transaction q-1
    h = Harness(deadline_app())
    state = {"asked": {"q-1": {"question": "why?"}}}
    # when its deadline expires
    result = await h.expire("desk", "no_answer", correlation_id="q-1", state=state)
    # then its function ran for q-1 and emitted what it returned
    assert result.emitted == [Unanswered(question="why?")]
    assert result.envelopes[0].correlationid == "q-1"


async def test_expire_of_an_unknown_timer_is_refused_clearly() -> None:
    with pytest.raises(ConfigurationError, match="no deadline or join timeout named 'nope'"):
        await Harness(deadline_app()).expire("desk", "nope")
