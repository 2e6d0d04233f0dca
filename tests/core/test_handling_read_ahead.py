"""What a batch reads ahead before its handlers run: the documents of the kinds its event types'
handlings got under their correlation id before (at most four kinds per type, learnt from
handlings that succeeded), none for a message already seen or late; and a message whose document
another transaction holds is handed back before its handler runs. Straight on the handling, in
transactions of a memory store wrapped to record what it is asked to read ahead (the memory and
SQLite stores read nothing ahead; PostgreSQL's read-ahead is tested in tests/stores)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from typing import Any

import pytest

from choreograph import App, Context, Event, PermanentFailure, Service
from choreograph.clock import VirtualClock
from choreograph.runtime.handling import Handling
from choreograph.store import DocumentBusy, Store, StoreTx, store_from_url
from choreograph.transport import Delivery, Message
from tests.support.deliveries import delivery


class Tracked(Event):
    kinds: list[str] = []
    """The kinds of documents the handler gets under the event's correlation id."""


class Noted(Event):
    pass


class Refused(Event):
    pass


class Step(Event):
    pass


class Audit(Event):
    pass


class Done(Event):
    pass


class _ReadingAhead:
    """A ``locks="raise"`` transaction that records what the handling reads ahead, in which
    another transaction holds some documents: read ahead, they are reported busy (as
    PostgreSQL's read-ahead reports them), and a ``get`` of one raises."""

    def __init__(self, tx: StoreTx, held: Collection[tuple[str, str]] = ()) -> None:
        self._tx, self._held = tx, set(held)
        self.asked: list[list[tuple[str, str]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def read_ahead(self, docs: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
        self.asked.append(list(docs))
        return {doc for doc in docs if doc in self._held}

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        if (kind, key) in self._held:
            raise DocumentBusy((kind, key))
        return await self._tx.get(kind, key)


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    store = store_from_url("memory://", "tracker")
    await store.open()
    yield store
    await store.close()


def tracker(ran: list[str]) -> Handling:
    """A service whose Tracked handler gets a document of the fleet and one of each kind the
    event names under its correlation id; Noted gets nothing; Refused gets one, then fails."""
    service = Service("tracker")

    @service.on(Tracked)
    async def track(event: Tracked, ctx: Context) -> None:
        ran.append(ctx.correlation_id)
        await ctx.state.get("fleet", "all")
        for kind in event.kinds:
            await ctx.state.get(kind, ctx.correlation_id)

    @service.on(Noted)
    async def note(event: Noted, ctx: Context) -> None:
        ran.append(ctx.correlation_id)

    @service.on(Refused)
    async def refuse(event: Refused, ctx: Context) -> None:
        await ctx.state.get("refusal", ctx.correlation_id)
        raise PermanentFailure("refused")

    return Handling(App("fleet", [service]), service, VirtualClock())


async def batch(
    store: Store, handling: Handling, deliveries: list[Delivery], held: set[tuple[str, str]]
) -> tuple[_ReadingAhead, list[tuple[Delivery, str]], list[tuple[Delivery, tuple[str, str]]]]:
    """Handle ``deliveries`` in one transaction while another holds ``held``: what was asked to
    be read ahead, each handled delivery's outcome, and those handed back."""
    async with store.transaction() as tx:
        reading = _ReadingAhead(tx, held)
        handled, handed_back = await handling.handle_batch(reading, deliveries)  # type: ignore[arg-type]
    return reading, [(d, outcome.kind) for d, _, outcome in handled], handed_back


async def test_a_batch_reads_ahead_the_kinds_its_types_handlings_got_under_their_transaction(
    store: Store,
) -> None:
    # given a first batch: a Tracked handling gets a drone and a delivery under its correlation
    # id (and the fleet's document under another key), a Refused one gets a refusal and fails
    ran: list[str] = []
    handling = tracker(ran)
    first, outcomes, _ = await batch(
        store, handling,
        [delivery(Tracked(kinds=["drone", "delivery"]), "c1"), delivery(Refused(), "c1")], set(),
    )  # fmt: skip
    assert [kind for _, kind in outcomes] == ["done", "dead_letter"]

    # when a batch of a Noted, two Tracked and a Refused of other transactions is handled
    second, outcomes, handed_back = await batch(
        store, handling,
        [delivery(Noted(), "c2"), delivery(Tracked(), "c2"), delivery(Refused(), "c3"),
         delivery(Tracked(), "c3")], set(),
    )  # fmt: skip

    # then nothing was read ahead of the first batch (nothing learnt yet); the second read, in
    # one go, the drone and the delivery of each Tracked's transaction: not the fleet's document,
    # nothing for Noted (it got nothing) nor for Refused (its handling failed)
    assert first.asked == []
    assert [sorted(docs) for docs in second.asked] == [
        [("delivery", "c2"), ("delivery", "c3"), ("drone", "c2"), ("drone", "c3")]
    ]
    assert [kind for _, kind in outcomes] == ["done", "done", "dead_letter", "done"]
    assert handed_back == []


async def test_at_most_four_kinds_are_read_ahead_per_type_the_first_learnt_kept(
    store: Store,
) -> None:
    # given a Tracked handling that got kinds b and a, then one that got f, e, d and c
    ran: list[str] = []
    handling = tracker(ran)
    first, _, _ = await batch(store, handling, [delivery(Tracked(kinds=["b", "a"]), "c1")], set())
    second, _, _ = await batch(
        store, handling, [delivery(Tracked(kinds=["f", "e", "d", "c"]), "c2")], set()
    )

    # when a Tracked of another transaction is handled
    third, _, _ = await batch(store, handling, [delivery(Tracked(), "c3")], set())

    # then the second read ahead the two kinds learnt first; the third four: those two and the
    # first two (in order) of the later handling's
    assert first.asked == []
    assert [sorted(docs) for docs in second.asked] == [[("a", "c2"), ("b", "c2")]]
    assert [sorted(docs) for docs in third.asked] == [
        [("a", "c3"), ("b", "c3"), ("c", "c3"), ("d", "c3")]
    ]


async def test_nothing_is_read_ahead_for_a_message_seen_or_late_or_of_a_type_that_got_none(
    store: Store,
) -> None:
    # given a service whose Step handler gets a record and whose Audit handler (run even after
    # the transaction's end) gets an audit, each under its correlation id, in an app that Done
    # ends; both learnt, then transaction a ended
    audit = Service("audit")

    @audit.on(Step)
    async def step(event: Step, ctx: Context) -> None:
        await ctx.state.get("record", ctx.correlation_id)

    @audit.on(Audit, after_end=True)
    async def keep(event: Audit, ctx: Context) -> None:
        await ctx.state.get("audit", ctx.correlation_id)

    @audit.on(Done)
    async def done(event: Done, ctx: Context) -> None:
        return None

    handling = Handling(App("auditing", [audit], terminal=[Done]), audit, VirtualClock())
    learning, _, _ = await batch(
        store, handling,
        [delivery(Step(), "a"), delivery(Audit(), "a"), delivery(Step(), "b", "step-b")], set(),
    )  # fmt: skip
    ending, _, _ = await batch(store, handling, [delivery(Done(), "a")], set())
    junk = Delivery(Message("junk", "Step", b"not json"), 1)

    # when a batch holds a message that cannot be read, one already handled, an Audit and a Step
    # of the ended transaction, and a Step and an Audit of another
    reading, outcomes, _ = await batch(
        store, handling,
        [junk, delivery(Step(), "b", "step-b"), delivery(Audit(), "a"), delivery(Step(), "a"),
         delivery(Step(), "c"), delivery(Audit(), "c")], set(),
    )  # fmt: skip

    # then it read ahead the Audit's document of the ended transaction and both of the other,
    # nothing for the unreadable, the duplicate and the late Step; a batch of only a type that
    # got nothing asked for nothing
    assert [sorted(docs) for docs in reading.asked] == [
        [("audit", "a"), ("audit", "c"), ("record", "c")]
    ]
    assert [kind for _, kind in outcomes] == [
        "dead_letter", "duplicate", "done", "late", "done", "done"
    ]  # fmt: skip
    assert learning.asked == [] and ending.asked == []


async def test_a_message_whose_document_is_busy_is_handed_back_before_its_handler_runs(
    store: Store,
) -> None:
    # given Tracked handlings that got a delivery and a drone under their correlation id
    ran: list[str] = []
    handling = tracker(ran)
    await batch(store, handling, [delivery(Tracked(kinds=["delivery", "drone"]), "c0")], set())

    # when a batch of Tracked of c1, c2, c3 and c2 again is handled while another transaction
    # holds c2's delivery and drone and c1's drone
    deliveries = [delivery(Tracked(), "c1"), delivery(Tracked(), "c2"), delivery(Tracked(), "c3"),
                  delivery(Tracked(), "c2")]  # fmt: skip
    held = {("delivery", "c2"), ("drone", "c2"), ("drone", "c1")}
    reading, outcomes, handed_back = await batch(store, handling, deliveries, held)

    # then the messages of c1 and c2 are handed back once each, with the first busy document
    # (in order) that each waits for, before their handlers ran; c3's was handled
    assert handed_back == [
        (deliveries[1], ("delivery", "c2")),
        (deliveries[3], ("delivery", "c2")),
        (deliveries[0], ("drone", "c1")),
    ]
    assert outcomes == [(deliveries[2], "done")]
    assert ran == ["c0", "c3"]
    assert len(reading.asked) == 1
