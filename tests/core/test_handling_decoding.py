"""What a handling does with a message before any handler runs: the size limit it reads with,
what a topic that disagrees with the type and a type nobody handles are told, what observers of
invalid messages learn, and the announcement of a compensation that cannot read its event.
Straight on the handling, in transactions of a memory store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from choreograph import App, CompensationFailed, Context, Event, Middleware, Service
from choreograph.clock import VirtualClock
from choreograph.envelope import encode, new_envelope
from choreograph.middleware import Outcome
from choreograph.orm import TransactionSession, create_tables
from choreograph.runtime.handling import Handling
from choreograph.runtime.hooks import Hooks
from choreograph.store import Store, store_from_url
from choreograph.transport import Delivery, Failure, Message


class Order(Event):
    order_id: str
    note: str = ""


class Refund(Event):
    order_id: str


class Invalid(Middleware):
    """Records what observers of invalid messages are told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes, Failure]] = []

    def on_invalid(self, service: str, body: bytes, failure: Failure) -> None:
        self.seen.append((service, body, failure))


def message(event_type: str, data: dict[str, object], topic: str | None = None) -> Message:
    envelope = new_envelope(event_type, data, source="t", correlation_id="tx")
    return Message(envelope.id, event_type if topic is None else topic, encode(envelope))


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    store = store_from_url("memory://", "payment")
    await store.open()
    yield store
    await store.close()


def payment() -> Service:
    service = Service("payment")

    @service.on(Order)
    async def charge(event: Order, ctx: Context) -> None:
        return None

    return service


async def handle(handling: Handling, store: Store, msg: Message) -> Outcome:
    async with store.transaction() as tx:
        _, outcome = await handling.handle(tx, Delivery(msg, 1))
    return outcome


async def test_a_message_beyond_the_handlings_own_limit_is_dead_lettered(store: Store) -> None:
    # given a handling that reads events of at most 1000 bytes (its bus' limit)
    service = payment()
    observer = Invalid()
    handling = Handling(App("shop", [service]), service, VirtualClock(), Hooks([observer]),
                        max_event_bytes=1000)  # fmt: skip
    big = message("Order", {"order_id": "o1", "note": "n" * 1500})

    # when an Order of 1.5 kB arrives, far below the default limit
    outcome = await handle(handling, store, big)

    # then it is dead-lettered as too large, and observers of invalid messages learn which
    # service refused which body, and why
    assert outcome.kind == "dead_letter"
    assert outcome.failure is not None
    assert outcome.failure.reason == "payload too large"
    assert observer.seen == [("payment", big.body, outcome.failure)]


async def test_an_event_on_another_types_topic_is_dead_lettered_saying_why(store: Store) -> None:
    service = payment()
    handling = Handling(App("shop", [service]), service, VirtualClock())

    # when a Refund arrives on the Order topic
    outcome = await handle(handling, store, message("Refund", {"order_id": "o1"}, topic="Order"))

    # then the dead letter says that a topic and its type must agree
    assert outcome.kind == "dead_letter"
    assert outcome.failure is not None
    assert outcome.failure.error == (
        "an event of type 'Refund' came on topic 'Order': events are routed by their topic and "
        "type alike, so the two must be equal"
    )


async def test_an_event_nobody_in_the_service_handles_is_dead_lettered_saying_so(
    store: Store,
) -> None:
    service = payment()
    handling = Handling(App("shop", [service]), service, VirtualClock())

    # when a Refund arrives with no topic (nothing to disagree with)
    outcome = await handle(handling, store, message("Refund", {"order_id": "o1"}, topic=""))

    # then the dead letter names the service and the type it does not handle
    assert outcome.kind == "dead_letter"
    assert outcome.failure is not None
    assert outcome.failure.reason == "unknown event type"
    assert outcome.failure.error == "service payment has no handler for 'Refund'"


async def test_a_compensation_that_cannot_read_its_event_announces_a_compensation_failure(
    store: Store,
) -> None:
    # given a compensation of a refund
    service = payment()

    @service.compensate(Refund, undoes="charge")
    async def refund(event: Refund, ctx: Context) -> None:
        return None

    handling = Handling(App("shop", [service]), service, VirtualClock())

    # when a Refund arrives without its field
    outcome = await handle(handling, store, message("Refund", {}))

    # then it is dead-lettered and announced as a failed compensation (a person must see it)
    assert outcome.kind == "dead_letter"
    (announced,) = outcome.emitted
    assert announced.type == CompensationFailed.event_type
    assert (announced.data["compensation"], announced.data["failed_event_type"]) == (
        "refund", "Refund"
    )  # fmt: skip


class _Tables(DeclarativeBase):
    pass


class _Charge(_Tables):
    __tablename__ = "charges"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)


async def test_a_handlings_session_is_cleared_after_it_and_kept_for_the_next(
    store: Store,
) -> None:
    # given a handler writing a row of its own table through its session
    service = Service("payment", tables=_Tables.metadata)
    sessions: list[tuple[TransactionSession, _Charge]] = []

    @service.on(Order)
    async def charge(event: Order, ctx: Context) -> None:
        row = _Charge(id=event.order_id)
        ctx.session.add(row)
        sessions.append((ctx.session, row))

    handling = Handling(App("shop", [service]), service, VirtualClock())
    async with store.transaction() as tx:
        await create_tables(tx, _Tables.metadata)

    # when it handles an order
    outcome = await handle(handling, store, message("Order", {"order_id": "o1"}))

    # then the row was written, and the session let go of it (nothing loaded or pending is left)
    assert outcome.kind == "done"
    async with store.transaction() as tx:
        assert [tuple(row) for row in tx.connection.execute("SELECT id FROM charges")] == [("o1",)]
    ((session, row),) = sessions
    assert row not in session
    assert not session.identity_map and not session.new
    # and the next handling on the store's connection gets that session back, empty
    assert (await handle(handling, store, message("Order", {"order_id": "o2"}))).kind == "done"
    assert sessions[1][0] is session
    assert row not in session
