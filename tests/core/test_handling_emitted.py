"""The envelopes of the events a service emits, from a handling and from outside one (a unit of
work): type, source, transaction, cause, trace context, partition key and the context observers
stamp them in; and what a handling emitted at once, not later. On the memory bus, or straight on
the handling in a transaction of a memory store."""

from __future__ import annotations

from choreograph import App, Context, Event, Middleware, Service
from choreograph.clock import VirtualClock
from choreograph.envelope import Envelope, encode
from choreograph.runtime.handling import Handling
from choreograph.store import store_from_url
from choreograph.testing import Harness
from choreograph.transport import Delivery, Message

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Debited(Event, partition_key="account_id"):
    account_id: str
    amount: int


class Requested(Event):
    account_id: str


def ledger_app() -> App:
    ledger = Service("ledger")

    @ledger.on(Requested, emits=[Debited])
    async def debit(event: Requested, ctx: Context) -> Debited:
        return Debited(account_id=event.account_id, amount=5)

    return App("bank", [ledger])


async def test_an_event_emitted_by_a_handling_carries_its_cause_trace_and_partition_key() -> None:
    async with Harness(ledger_app()) as h:
        # when a handling emits an event whose type is partitioned by a field
        cause = Envelope(id="r1", type="Requested", source="client", correlationid="tx-1",
                         data={"account_id": "acct-7"}, traceparent=TRACEPARENT,
                         tracestate="vendor=1")  # fmt: skip
        await h.transport.publish([Message(cause.id, cause.type, encode(cause))])
        debited = await h.wait_for(Debited)

    # then its envelope says who emitted it, in which transaction, caused by what, in which
    # trace, and by which key it is partitioned
    assert debited.type == "Debited"
    assert (debited.source, debited.correlationid, debited.causationid) == ("ledger", "tx-1", "r1")
    assert (debited.traceparent, debited.tracestate) == (TRACEPARENT, "vendor=1")
    assert debited.extensions == {"partitionkey": "acct-7"}
    assert debited.dataschema == Debited.dataschema()
    assert debited.data == {"account_id": "acct-7", "amount": 5}


async def test_an_event_emitted_from_outside_a_handling_starts_or_joins_a_transaction() -> None:
    async with Harness(ledger_app()) as h:
        # when a unit of work of the service emits an event in a transaction
        async with h.runtime.unit_of_work("ledger", correlation_id="tx-2") as uow:
            uow.emit(Debited(account_id="acct-8", amount=3))
        debited = await h.wait_for(Debited)
        # and the service's handling makes the envelope of one with no transaction at all
        alone = h.runtime.workers["ledger"].handling.envelope_for(
            None, Debited(account_id="acct-9", amount=1)
        )

    # then the first is the service's, in that transaction, caused by nothing, and partitioned
    assert debited.type == "Debited"
    assert (debited.source, debited.correlationid, debited.causationid) == ("ledger", "tx-2", None)
    assert debited.extensions == {"partitionkey": "acct-8"}
    assert debited.dataschema == alone.dataschema == Debited.dataschema()
    # and the second starts a transaction named after its own id
    assert (alone.type, alone.source, alone.correlationid) == ("Debited", "ledger", alone.id)
    assert alone.extensions == {"partitionkey": "acct-9"}


class Stamps(Middleware):
    """Records the context each envelope is stamped in (its event's id, None outside one)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    def stamp(self, ctx: Context | None, envelope: Envelope) -> Envelope:
        self.seen.append((envelope.type, None if ctx is None else ctx.event_id))
        return envelope


async def test_observers_stamp_an_envelope_in_the_context_of_the_handling_that_emits_it() -> None:
    stamps = Stamps()
    async with Harness(ledger_app(), middleware=[stamps]) as h:
        # when a handling of event r1 emits an event, and a unit of work emits one
        cause = Envelope(id="r1", type="Requested", source="client", correlationid="tx-1",
                         data={"account_id": "acct-7"})  # fmt: skip
        await h.transport.publish([Message(cause.id, cause.type, encode(cause))])
        await h.wait_for(Debited)
        async with h.runtime.unit_of_work("ledger", correlation_id="tx-2") as uow:
            uow.emit(Debited(account_id="acct-8", amount=3))
        await h.wait_for(Debited, correlation_id="tx-2")

    # then the first is stamped in the handling's context, the second in none
    assert stamps.seen == [("Debited", "r1"), ("Debited", None)]


async def test_an_event_emitted_later_is_not_among_what_a_handling_emitted_at_once() -> None:
    # given a handler emitting one event at once and one half a second after its commit
    ledger = Service("ledger")

    @ledger.on(Requested, emits=[Debited])
    async def debit(event: Requested, ctx: Context) -> Debited:
        ctx.emit_later(Debited(account_id=event.account_id, amount=1), 0.5)
        return Debited(account_id=event.account_id, amount=5)

    handling = Handling(App("bank", [ledger]), ledger, VirtualClock())
    store = store_from_url("memory://", "ledger")
    cause = Envelope(id="r1", type="Requested", source="client", correlationid="tx-1",
                     data={"account_id": "acct-7"})  # fmt: skip
    await store.open()
    try:
        # when it handles an event
        async with store.transaction() as tx:
            _, outcome = await handling.handle(
                tx, Delivery(Message(cause.id, cause.type, encode(cause)), 1)
            )
    finally:
        await store.close()

    # then the handling emitted, and publishes after its commit, the first only (the relay
    # publishes the later one when due)
    assert outcome.kind == "done"
    assert [envelope.data["amount"] for envelope in outcome.emitted] == [5]
    assert [message.id for message in outcome.ready] == [outcome.emitted[0].id]
