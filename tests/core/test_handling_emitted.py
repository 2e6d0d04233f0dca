"""The envelopes of the events a service emits, from a handling and from outside one (a unit of
work): type, source, transaction, cause, trace context and partition key. On the memory bus."""

from __future__ import annotations

from choreograph import App, Context, Event, Service
from choreograph.envelope import Envelope, encode
from choreograph.testing import Harness
from choreograph.transport import Message

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
