"""How a handling that gives up announces it: one announcement per failure (an id of its own,
the same when the same failure is announced again), none past the deepest level, and a dead
letter that says so when no announcement can be staged. On the memory bus and a virtual clock;
single handlings on a memory store."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest

from choreograph import (
    App,
    Context,
    DeadlineExpired,
    Event,
    HandlerFailed,
    JoinTimedOut,
    Parts,
    PermanentFailure,
    Service,
)
from choreograph.clock import VirtualClock
from choreograph.envelope import encode, new_envelope
from choreograph.events import MAX_ANNOUNCEMENT_DEPTH
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
