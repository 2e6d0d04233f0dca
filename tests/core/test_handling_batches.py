"""What the handlings of one batch share: the inbox (a message twice in a batch is handled once),
the ends of transactions (an end in the batch makes the rest of its transaction late), and a
transaction's end that another transaction holds (its messages are handed back, the others
handled). Straight on the handling, in transactions of a memory store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from typing import Any

import pytest

from choreograph import App, Context, Event, Service
from choreograph.clock import VirtualClock
from choreograph.runtime.handling import Handling
from choreograph.store import DocumentBusy, Store, StoreTx, store_from_url
from tests.support.deliveries import delivery


class Step(Event):
    n: int


class Done(Event):
    pass


class Closing(Event):
    pass


class Failed(Event):
    pass


def steps_app(ran: list[tuple[str, str]]) -> tuple[App, Service]:
    """A service noting each Step it runs, ending its transaction on Closing (it emits Done)."""
    steps = Service("steps")

    @steps.on(Step)
    async def step(event: Step, ctx: Context) -> None:
        ran.append((ctx.correlation_id, f"step {event.n}"))

    @steps.on(Closing, emits=[Done])
    async def close(event: Closing, ctx: Context) -> Done:
        ran.append((ctx.correlation_id, "close"))
        return Done()

    @steps.on(Done)
    async def done(event: Done, ctx: Context) -> None:
        ran.append((ctx.correlation_id, "done"))

    app = App("stepping", [steps], terminal=[Done])
    return app, steps


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    store = store_from_url("memory://", "steps")
    await store.open()
    yield store
    await store.close()


async def test_an_end_in_a_batch_makes_the_rest_of_its_transaction_late(store: Store) -> None:
    # given a batch in which transaction a ends (a terminal event arrives), transaction b ends
    # (its handler emits a terminal event), each followed by a step; and a step of c
    ran: list[tuple[str, str]] = []
    app, steps = steps_app(ran)
    handling = Handling(app, steps, VirtualClock())
    batch = [delivery(Done(), "a"), delivery(Step(n=1), "a"), delivery(Closing(), "b"),
             delivery(Step(n=2), "b"), delivery(Step(n=3), "c")]  # fmt: skip

    # when it is handled
    async with store.transaction() as tx:
        handled, handed_back = await handling.handle_batch(tx, batch)

    # then the steps after each end are late, saying with what it ended; the others ran
    outcomes = [(outcome.kind, outcome.note) for _, _, outcome in handled]
    assert outcomes == [
        ("done", ""),
        ("late", "the transaction already ended with Done"),
        ("done", ""),
        ("late", "the transaction already ended with Done"),
        ("done", ""),
    ]
    assert ran == [("a", "done"), ("b", "close"), ("c", "step 3")]
    assert handed_back == []
    # and the store knows both ends after the commit
    async with store.transaction() as tx:
        assert await tx.ended_transactions(["a", "b", "c"]) == {"a": "Done", "b": "Done"}


async def test_a_message_twice_in_one_batch_is_handled_once(store: Store) -> None:
    ran: list[tuple[str, str]] = []
    app, steps = steps_app(ran)
    handling = Handling(app, steps, VirtualClock())
    twice = delivery(Step(n=1), "a", event_id="e1")

    # when a batch holds one message twice
    async with store.transaction() as tx:
        handled, _ = await handling.handle_batch(tx, [twice, twice])

    # then the second is a duplicate
    assert [outcome.kind for _, _, outcome in handled] == ["done", "duplicate"]
    assert ran == [("a", "step 1")]


class _EndHeldTx:
    """A ``locks="raise"`` transaction in which another transaction holds the ends of some
    transactions (as PostgreSQL's row locks would)."""

    def __init__(self, tx: StoreTx, held: set[str]) -> None:
        self._tx, self._held = tx, held
        self.asked: list[set[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def ended_transactions(self, correlation_ids: Collection[str]) -> dict[str, str]:
        self.asked.append(set(correlation_ids))
        for correlation_id in sorted(correlation_ids):
            if correlation_id in self._held:
                raise DocumentBusy(("ended", correlation_id))
        return await self._tx.ended_transactions(correlation_ids)


async def test_messages_whose_transactions_end_is_busy_are_handed_back(store: Store) -> None:
    # given a batch of steps of three transactions, another transaction holding the ends of two
    ran: list[tuple[str, str]] = []
    app, steps = steps_app(ran)
    handling = Handling(app, steps, VirtualClock())
    batch = [delivery(Step(n=1), "a"), delivery(Step(n=2), "b"), delivery(Step(n=3), "a"),
             delivery(Step(n=4), "c"), delivery(Step(n=5), "d")]  # fmt: skip

    # when it is handled
    async with store.transaction() as tx:
        held = _EndHeldTx(tx, {"a", "c"})
        handled, handed_back = await handling.handle_batch(held, batch)  # type: ignore[arg-type]

    # then the messages of those two are handed back with what they wait for, in order, the
    # others handled; the ends were asked for again without each busy one
    assert [(d, lock) for d, lock in handed_back] == [
        (batch[0], ("ended", "a")), (batch[2], ("ended", "a")), (batch[3], ("ended", "c"))
    ]  # fmt: skip
    assert [(d, outcome.kind) for d, _, outcome in handled] == [(batch[1], "done"),
                                                                (batch[4], "done")]  # fmt: skip
    assert ran == [("b", "step 2"), ("d", "step 5")]
    assert held.asked == [{"a", "b", "c", "d"}, {"b", "c", "d"}, {"b", "d"}]


async def test_a_service_that_only_emits_the_end_knows_its_transaction_ended(store: Store) -> None:
    # given a service that ends transactions (it emits Done) but never receives Done
    ran: list[tuple[str, str]] = []
    closer = Service("closer")

    @closer.on(Closing, emits=[Done])
    async def close(event: Closing, ctx: Context) -> Done:
        ran.append((ctx.correlation_id, "close"))
        return Done()

    @closer.on(Step)
    async def step(event: Step, ctx: Context) -> None:
        ran.append((ctx.correlation_id, f"step {event.n}"))

    app = App("closing", [closer], terminal=[Done])
    handling = Handling(app, closer, VirtualClock())

    # when it ends a transaction, then a step of it arrives in the same batch and in a later one
    async with store.transaction() as tx:
        first, _ = await handling.handle_batch(tx, [delivery(Closing(), "a"),
                                                    delivery(Step(n=1), "a")])  # fmt: skip
    async with store.transaction() as tx:
        later, _ = await handling.handle_batch(tx, [delivery(Step(n=2), "a"),
                                                    delivery(Step(n=3), "b")])  # fmt: skip

    # then both steps of it are late; the other transaction's step ran
    assert [o.kind for _, _, o in first] + [o.kind for _, _, o in later] == [
        "done", "late", "late", "done"
    ]  # fmt: skip
    assert ran == [("a", "close"), ("b", "step 3")]


async def test_a_batch_asks_for_the_ends_it_may_be_late_for_or_makes(store: Store) -> None:
    # given a service that audits every Step even after the end, and learns of ends
    ran: list[tuple[str, str]] = []
    audit = Service("audit")

    @audit.on(Step, after_end=True)
    async def keep(event: Step, ctx: Context) -> None:
        ran.append((ctx.correlation_id, "kept"))

    @audit.on(Closing)
    async def closing(event: Closing, ctx: Context) -> None:
        ran.append((ctx.correlation_id, "closing"))

    @audit.on(Done)
    async def done(event: Done, ctx: Context) -> None:
        ran.append((ctx.correlation_id, "done"))

    app = App("auditing", [audit], terminal=[Done])
    handling = Handling(app, audit, VirtualClock())

    # when a batch holds a step (handled even after the end), a Closing and the end of another
    async with store.transaction() as tx:
        asking = _EndHeldTx(tx, set())
        batch = [delivery(Step(n=1), "a"), delivery(Closing(), "b"), delivery(Done(), "c")]
        handled, _ = await handling.handle_batch(asking, batch)  # type: ignore[arg-type]

    # then it asks once for the ends of the transactions the Closing may be late for and the
    # Done ends (which a store with locks then holds until the commit), not the step's
    assert asking.asked == [{"b", "c"}]
    assert [outcome.kind for _, _, outcome in handled] == ["done", "done", "done"]


async def test_an_end_emitted_by_a_handler_running_after_ends_is_known(store: Store) -> None:
    # given a service whose compensation of a failed step ends the transaction (emits Done)
    ran: list[tuple[str, str]] = []
    _, steps = steps_app(ran)

    @steps.compensate(Failed, undoes="step", emits=[Done])
    async def undo(event: Failed, ctx: Context) -> Done:
        ran.append((ctx.correlation_id, "undo"))
        return Done()

    handling = Handling(App("undoing", [steps], terminal=[Done]), steps, VirtualClock())

    # when a batch holds only that failure, and a step of its transaction comes later
    async with store.transaction() as tx:
        first, _ = await handling.handle_batch(tx, [delivery(Failed(), "a")])
    async with store.transaction() as tx:
        later, _ = await handling.handle_batch(tx, [delivery(Step(n=1), "a")])

    # then the compensation ran and ended the transaction: the step is late
    assert [o.kind for _, _, o in first + later] == ["done", "late"]
    assert ran == [("a", "undo")]
