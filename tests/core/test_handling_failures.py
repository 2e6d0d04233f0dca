"""How a handling that gives up announces it: one announcement per failure (an id of its own,
the same when the same failure is announced again), none past the deepest level, and a dead
letter that says so when no announcement can be staged. On the memory bus and a virtual clock;
single handlings on a memory store."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from pydantic import field_validator

from choreograph import (
    App,
    Context,
    DeadlineExpired,
    Event,
    HandlerFailed,
    JoinTimedOut,
    Parts,
    PermanentFailure,
    RetryPolicy,
    Service,
)
from choreograph.clock import VirtualClock
from choreograph.envelope import Envelope, encode, new_envelope
from choreograph.events import MAX_ANNOUNCEMENT_DEPTH
from choreograph.middleware import Middleware, Next, Outcome
from choreograph.runtime.handling import Handling
from choreograph.store import DocumentBusy, OutboxRow, StoreTx, store_from_url
from choreograph.testing import Harness
from choreograph.transport import Delivery, Message


class Left(Event):
    key: str


class Right(Event):
    key: str


class Order(Event):
    order_id: str


def failing_app() -> App:
    """Three failures of each Left: a deadline and a join timeout of service a, both started
    by it, and a handler of service b named as a's deadline; a listener counts announcements."""
    a = Service("a")
    b = Service("b")
    listener = Service("listener")

    @a.deadline(starts_on=Left, expect=[Right], within=10)
    async def overdue(expired: DeadlineExpired, ctx: Context) -> None:
        raise PermanentFailure("deadline failed")

    async def timed_out(event: JoinTimedOut, ctx: Context) -> None:
        raise PermanentFailure("timeout failed")

    @a.join(Left, Right, key="key", within=10, on_timeout=timed_out)
    async def pair(parts: Parts, ctx: Context) -> None:
        return None

    async def overdue_in_b(event: Left, ctx: Context) -> None:
        raise PermanentFailure("handler failed")

    overdue_in_b.__name__ = "overdue"
    b.on(Left)(overdue_in_b)

    @listener.on(HandlerFailed)
    async def count(event: HandlerFailed, ctx: Context) -> None:
        key = f"{event.service}/{event.handler}/{event.failed_event_id}"
        doc = await ctx.state.get("announced", key) or {"n": 0}
        await ctx.state.put("announced", key, {"n": doc["n"] + 1})

    return App("failing", [a, b, listener])


async def handled_alone(service: Service, envelope: Envelope) -> Outcome:
    """The outcome of one envelope handled alone by ``service``, on a memory store."""
    handling = Handling(App("app", [service]), service, VirtualClock())
    store = store_from_url("memory://", service.name)
    await store.open()
    try:
        async with store.transaction() as tx:
            message = Message(envelope.id, envelope.type, encode(envelope))
            _, outcome = await handling.handle(tx, Delivery(message, 1))
    finally:
        await store.close()
    return outcome


async def test_each_failure_is_announced_once_under_an_id_of_its_own() -> None:
    async with Harness(failing_app()) as h:
        # when two Left events fail, each in a deadline and a join timeout of one service and
        # in a handler of another service named as that deadline
        lefts = [await h.publish(Left(key=key), correlation_id=key) for key in ("k1", "k2")]
        await h.advance(11)
        await h.settle()
        async with h.runtime.unit_of_work("listener") as uow:
            announced = dict(await uow.state.find("announced", limit=100))
        ids = {e.id for e in h.published(HandlerFailed)}

        # then each of the six failures was announced under an id of its own, and the listener
        # handled each once
        assert announced == {
            f"{service}/{name}/{left.id}": {"n": 1}
            for left in lefts
            for service, name in (("a", "overdue"), ("a", "pair"), ("b", "overdue"))
        }
        assert len(ids) == 6

        # when one of them fails again (its dead letter replayed)
        (dead,) = [d for d in await h.dead_letters("b") if d.message.id == lefts[0].id]
        assert await h.transport.replay(dead.id)
        await h.settle()
        again = h.published(HandlerFailed)[6:]

    # then it is announced under the same id as the first time, which the listener skips
    assert [(e.data["service"], e.data["handler"], e.data["failed_event_id"]) for e in again] == [
        ("b", "overdue", lefts[0].id)
    ]
    assert again[0].id in ids
    assert announced[f"b/overdue/{lefts[0].id}"] == {"n": 1}


async def test_a_failure_past_the_deepest_announcement_is_dead_lettered_without_one() -> None:
    # given a handler of announcements that fails for good
    watcher = Service("watcher")

    @watcher.on(HandlerFailed)
    async def page(event: HandlerFailed, ctx: Context) -> None:
        raise PermanentFailure("pager down")

    deepest = HandlerFailed(service="s", handler="h", failed_event_type="X", failed_event_id="x1",
                            reason="r", error_type="E", attempts=1,
                            depth=MAX_ANNOUNCEMENT_DEPTH)  # fmt: skip
    async with Harness(App("deep", [watcher])) as h:
        # when it fails on an announcement of the deepest level
        result = await h.call("watcher", deepest)

    # then the announcement is dead-lettered, announcing nothing, and both say why
    why = f"not announced: failure announcements are at most {MAX_ANNOUNCEMENT_DEPTH} deep"
    assert (result.outcome, result.note, result.emitted) == ("dead_letter", why, [])
    assert result.failure is not None
    assert result.failure.reason == "permanent failure"
    assert result.failure.error == f"pager down ({why})"


class _RefusingTx:
    """A store transaction whose outbox refuses failure announcements (e.g. a full disk for
    rows that large), with a long error."""

    def __init__(self, tx: StoreTx) -> None:
        self._tx = tx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def add_outbox(self, rows: Sequence[OutboxRow], claimed_until: float = 0.0) -> None:
        if any(row.topic == HandlerFailed.event_type for row in rows):
            raise OSError("outbox refused: " + "x" * 2000)
        await self._tx.add_outbox(rows, claimed_until)


def order(order_id: str) -> Delivery:
    envelope = new_envelope("Order", {"order_id": order_id}, source="shop", correlation_id="tx")
    return Delivery(Message(envelope.id, envelope.type, encode(envelope)), 1)


async def test_a_failure_that_cannot_be_announced_is_dead_lettered_saying_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given a handler that fails for good, in a store refusing its announcement in every form
    caplog.set_level(logging.ERROR, logger="choreograph.handling")
    payment = Service("payment")

    @payment.on(Order)
    async def charge(event: Order, ctx: Context) -> None:
        raise PermanentFailure("card declined")

    handling = Handling(App("shop", [payment]), payment, VirtualClock())
    store = store_from_url("memory://", "payment")
    await store.open()
    try:
        # when it handles an order
        async with store.transaction() as tx:
            _, outcome = await handling.handle(_RefusingTx(tx), order("o1"))  # type: ignore[arg-type]
    finally:
        await store.close()

    # then the order is dead-lettered for its own failure, announcing nothing; the outcome
    # says why (bounded) and an operator is told
    problem = OSError("outbox refused: " + "x" * 2000)
    assert outcome.kind == "dead_letter"
    assert outcome.emitted == []
    assert outcome.failure is not None
    assert (outcome.failure.reason, outcome.failure.error) == ("permanent failure", "card declined")
    assert outcome.note == f"not announced: OSError: {problem}"[:1000]
    assert len(outcome.note) == 1000
    assert [r.getMessage() for r in caplog.records if r.name == "choreograph.handling"] == [
        f"payment: the failure of charge could not be announced: {problem!r}"
    ]


class _HeldTx:
    """A ``locks="raise"`` transaction in which another transaction holds some documents."""

    def __init__(self, tx: StoreTx, held: set[tuple[str, str]]) -> None:
        self._tx, self._held = tx, held

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        if (kind, key) in self._held:
            raise DocumentBusy((kind, key))
        return await self._tx.get(kind, key)


async def test_handling_one_message_raises_what_it_found_busy() -> None:
    # given a handler reading a document another transaction holds
    payment = Service("payment")

    @payment.on(Order)
    async def charge(event: Order, ctx: Context) -> None:
        await ctx.state.get("account", event.order_id)

    handling = Handling(App("shop", [payment]), payment, VirtualClock())
    store = store_from_url("memory://", "payment")
    await store.open()
    try:
        async with store.transaction() as tx:
            held = _HeldTx(tx, {("account", "o1")})
            # when one message is handled alone
            with pytest.raises(DocumentBusy) as busy:
                await handling.handle(held, order("o1"))  # type: ignore[arg-type]
    finally:
        await store.close()

    # then it raises what it found busy, for the caller to take first
    assert busy.value.lock == ("account", "o1")


# retry policies and what a failure says -----------------------------------------------------------


class Paid(Event):
    order_id: str


class Shipped(Event):
    order_id: str


class Stray(Event):
    pass


class Started(Event):
    pass


def payment_app(behaviour: str) -> App:
    """A payment handler with a policy of its own (2 attempts), in a service that would try 5
    times with growing delays."""
    payment = Service("payment", retry=RetryPolicy(max_attempts=5, immediate=0, base_delay=3.0,
                                                   jitter=0.0))  # fmt: skip

    own = RetryPolicy(max_attempts=2, immediate=0, base_delay=1.0, jitter=0.0)

    @payment.on(Order, emits=[Paid, Shipped], retry=own)
    async def charge(event: Order, ctx: Context) -> Stray | None:
        if behaviour == "raises":
            raise ValueError("é\ud800\x00" + "x" * 3000)
        if behaviour == "later":
            ctx.emit_later(Stray(), 5)
        if behaviour == "returns":
            return Stray()
        return None

    @payment.on(Paid)
    async def record(event: Paid, ctx: Context) -> Stray:
        return Stray()

    return App("shop", [payment])


async def test_a_handlers_own_retry_policy_decides_over_the_services() -> None:
    async with Harness(payment_app("raises")) as h:
        # when the handler fails on its first and on its second attempt
        first = await h.call("payment", Order(order_id="o1"))
        second = await h.call("payment", Order(order_id="o1"), attempt=2)

    # then its own policy retries the first after its own delay, and gives up on the second
    assert (first.outcome, second.outcome) == ("retry", "dead_letter")
    assert first.failure is not None
    assert first.failure.reason == "handler error"
    assert second.failure is not None
    assert second.failure.reason == "attempts exhausted"


async def test_what_a_failure_says_is_bounded_readable_text_with_its_traceback() -> None:
    async with Harness(payment_app("raises")) as h:
        # when the handler fails with a long error holding an unpaired surrogate and a NUL
        result = await h.call("payment", Order(order_id="o1"))

    # then the failure keeps its first 2000 characters, as valid UTF-8 without NUL, and the
    # traceback as Python prints it
    assert result.failure is not None
    assert result.failure.error_type == "ValueError"
    assert result.failure.error == "é?\\0" + "x" * 1997
    assert result.failure.traceback.startswith("Traceback (most recent call last):\n  File ")
    assert "\n    raise ValueError(" in result.failure.traceback


@pytest.mark.parametrize(
    ("behaviour", "declared"),
    [("later", "Paid, Shipped"), ("returns", "Paid, Shipped")],
)
async def test_emitting_an_undeclared_event_names_the_handler_and_what_it_declares(
    behaviour: str, declared: str
) -> None:
    async with Harness(payment_app(behaviour)) as h:
        # when the handler emits (at once or later) an event it does not declare
        result = await h.call("payment", Order(order_id="o1"))

    # then it fails for good, saying which handler emitted what, and what it declares
    assert result.outcome == "dead_letter"
    assert result.later == []
    assert result.failure is not None
    assert result.failure.error == (
        f"charge emitted Stray, which its declaration does not list in emits ({declared})"
    )


async def test_a_handler_that_declares_no_emission_says_it_may_emit_nothing() -> None:
    async with Harness(payment_app("")) as h:
        result = await h.call("payment", Paid(order_id="o1"))

    assert result.failure is not None
    assert result.failure.error == (
        "record emitted Stray, which its declaration does not list in emits (nothing)"
    )


class Throttled(Middleware):
    """Middleware that refuses the first handling it sees (a rate limiter, say)."""

    def __init__(self) -> None:
        self.refused = 0

    async def around_handle(self, ctx: Context, call_next: Next) -> list[Event]:
        if not self.refused:
            self.refused += 1
            raise ConnectionError("limiter unreachable")
        return await call_next()


async def test_a_handling_with_no_handler_of_its_own_is_retried_with_the_services_policy() -> None:
    # given a service that only starts a deadline on Started, whose middleware fails once
    watch = Service("watch", retry=RetryPolicy(max_attempts=3, immediate=0, base_delay=3.0,
                                               jitter=0.0))  # fmt: skip

    @watch.deadline(starts_on=Started, expect=[Paid], within=60)
    async def unpaid(expired: DeadlineExpired, ctx: Context) -> None:
        return None

    async with Harness(App("watching", [watch]), middleware=[Throttled()]) as h:
        # when it handles Started, then again
        first = await h.call("watch", Started())
        second = await h.call("watch", Started(), attempt=2)

    # then the first is retried after the service's delay, the second sets the deadline
    assert (first.outcome, first.timers) == ("retry", [])
    assert first.failure is not None
    assert (first.failure.reason, first.failure.error) == ("handler error", "limiter unreachable")
    assert second.outcome == "done"
    assert [t.name for t in second.timers] == ["deadline:unpaid"]


async def test_a_handlers_retry_jitter_comes_from_the_handlings_random_source() -> None:
    # given a handling whose random source is seeded, of a handler that fails, retried with
    # jitter
    payment = Service("payment", retry=RetryPolicy(max_attempts=5, immediate=0, base_delay=8.0,
                                                   jitter=0.5))  # fmt: skip

    @payment.on(Order)
    async def charge(event: Order, ctx: Context) -> None:
        raise ConnectionError("unreachable")

    handling = Handling(App("shop", [payment]), payment, VirtualClock(), rng=random.Random(7))
    store = store_from_url("memory://", "payment")
    await store.open()
    try:
        # when it fails twice
        delays = []
        for attempt in (1, 2):
            async with store.transaction() as tx:
                _, outcome = await handling.handle(tx, replace(order("o1"), attempt=attempt))
            assert outcome.kind == "retry"
            delays.append(outcome.delay)
    finally:
        await store.close()

    # then both delays are those the seeded source gives, in turn
    same = random.Random(7)
    assert delays == [payment.retry.delay(1, same), payment.retry.delay(2, same)]
    assert delays[0] != 8.0


async def test_a_message_that_cannot_be_read_is_dead_lettered_without_a_traceback() -> None:
    # given an Order whose data lacks its one field
    payment = Service("payment")

    @payment.on(Order)
    async def charge(event: Order, ctx: Context) -> None:
        return None

    envelope = new_envelope("Order", {}, source="shop", correlation_id="tx")

    # when it is handled
    outcome = await handled_alone(payment, envelope)

    # then it is dead-lettered for what it is, with no traceback (the reason says it all)
    assert outcome.kind == "dead_letter"
    assert outcome.failure is not None
    assert (outcome.failure.reason, outcome.failure.error_type) == (
        "schema violation",
        "SchemaViolation",
    )
    assert outcome.failure.traceback == ""


class Odd(Event):
    value: str

    @field_validator("value")
    @classmethod
    def _checked(cls, value: str) -> str:
        raise RuntimeError("cannot check " + value)


async def test_data_that_fails_to_validate_otherwise_is_a_bounded_schema_violation() -> None:
    # given an event type whose validation itself breaks (not a validation error)
    reader = Service("reader")

    @reader.on(Odd)
    async def read(event: Odd, ctx: Context) -> None:
        return None

    envelope = new_envelope("Odd", {"value": "v" * 1000}, source="t", correlation_id="tx")

    # when such an event is handled
    outcome = await handled_alone(reader, envelope)

    # then it is never retried: a schema violation naming the type and (the start of) what broke
    assert outcome.kind == "dead_letter"
    assert outcome.failure is not None
    assert (outcome.failure.reason, outcome.failure.error_type) == (
        "schema violation",
        "SchemaViolation",
    )
    broke = repr(RuntimeError("cannot check " + "v" * 1000))[:500]
    assert outcome.failure.error == f"Odd: cannot validate: {broke}"
    (announced,) = outcome.emitted
    assert announced.type == HandlerFailed.event_type
    assert announced.data["handler"] == "read"
