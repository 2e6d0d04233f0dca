"""The key a key-partitioned group orders an event by (``docs/ordering.md``): the envelope's
``partitionkey`` (CloudEvents Partitioning), which an event type may fill from one of its fields,
else the correlation id."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from choreograph import App, ConfigurationError, Event, Runtime, Service
from choreograph.envelope import decode, encode, new_envelope, partition_hash, partition_key
from choreograph.transport import Delivery
from choreograph.transports.memory import MemoryTransport


class Debited(Event, partition_key="account_id"):
    account_id: str
    amount: int


class Noted(Event):
    note: str


def test_the_correlation_id_is_the_key_unless_a_partitionkey_is_given() -> None:
    plain = new_envelope("T", {"correlationid": "not this one"}, source="s", correlation_id="tx-1")
    assert partition_key(encode(plain)) == "tx-1"
    keyed = plain.evolve(extensions={"partitionkey": "acct-7"})
    assert partition_key(encode(keyed)) == "acct-7"
    # an escaped value is read exactly, and so is an event written by someone else
    assert partition_key(encode(plain.evolve(correlationid='a"b\\c'))) == 'a"b\\c'
    foreign = {"data": {"partitionkey": "no"}, "specversion": "1.0", "correlationid": "tx-9"}
    assert partition_key(orjson.dumps(foreign)) == "tx-9"
    # a body that is no CloudEvent has none (the transport then uses the message id)
    assert partition_key(b"not json") is None
    assert partition_key(b'["a list"]') is None


def event(**attributes: object) -> bytes:
    return orjson.dumps(
        {"specversion": "1.0", "id": "e1", "type": "T", "source": "s", **attributes}
    )


def test_the_key_read_where_it_stands_is_the_one_the_event_decodes_with() -> None:
    # a correlationid of a nested object before the event's own is not the event's
    nested = event(data={"correlationid": "no"}, correlationid="tx-1")
    assert nested.index(b'"correlationid":"no"') < nested.index(b'"correlationid":"tx-1"')
    assert partition_key(nested) == "tx-1"
    # written twice, JSON keeps the last: so do the key and the decoded event
    twice = event(correlationid="a")[:-1] + b',"correlationid":"b"}'
    assert partition_key(twice) == decode(twice).correlationid == "b"


def test_the_key_read_where_it_stands_ends_at_its_closing_quote() -> None:
    # an escaped correlation id (the event has no other) is read in full
    escaped = new_envelope("T", {}, source="s", correlation_id='a"b\\c')
    assert partition_key(encode(escaped)) == 'a"b\\c'
    # and one that is not, wherever it stands in the body
    for length in range(1, 200):
        assert partition_key(event(id="x" * length, correlationid="k", n="~")) == "k", length


@pytest.mark.parametrize(
    "body",
    [
        event(),  # no correlationid at all
        event(correlationid=""),
        event(correlationid=5),
        event(partitionkey="", correlationid=""),
        b'{{"correlationid":"k"}}',  # not JSON
        b'["correlationid":"k"]',  # not JSON, nor an object
    ],
)
def test_no_key_from_an_empty_or_unreadable_one(body: bytes) -> None:
    assert partition_key(body) is None


@pytest.mark.parametrize(
    "body",
    [b'{"correlationid":"\xff"}', b'{"id":"\xc3","correlationid":"\xe2\x82"}', b"\xff", b""],
)
def test_any_body_gives_a_key_or_none_never_an_error(body: bytes) -> None:
    # publish calls it on whatever it is given: a body that is not UTF-8 is no reason to fail
    assert partition_key(body) in (None, "\ufffd")


def test_an_event_type_names_the_field_that_partitions_it() -> None:
    assert Debited(account_id="acct-7", amount=1).envelope_extensions() == {
        "partitionkey": "acct-7"
    }
    assert Noted(note="x").envelope_extensions() == {}
    with pytest.raises(ConfigurationError, match="partition_key 'account' is not a field"):

        class Bad(Event, partition_key="account"):
            account_id: str


async def test_emitted_and_published_events_carry_their_partitionkey() -> None:
    # given a service emitting Noted for each Debited, and an observer of both
    service = Service("ledger")

    @service.on(Debited, emits=[Noted])
    async def debit(event: Debited, ctx: object) -> Noted:
        return Noted(note=event.account_id)

    bus = MemoryTransport()
    await bus.connect()
    observer = await bus.subscribe("observer", ["Debited", "Noted"])
    async with Runtime(App("bank", [service]), transport=bus, store="memory://") as runtime:
        # when a Debited is published in transaction tx-1
        await runtime.publish(Debited(account_id="acct-7", amount=5), source="t",
                              correlation_id="tx-1")  # fmt: skip
        got: list[Delivery] = []
        async with asyncio.timeout(60):
            while len(got) < 2:
                got += await observer.receive(2, 1.0)

    # then Debited is partitioned by its account, Noted (no partition_key) by its transaction
    keys = {decode(d.message.body).type: partition_key(d.message.body) for d in got}
    assert keys == {"Debited": "acct-7", "Noted": "tx-1"}


def test_the_partition_hash_is_the_crc32_of_the_key_every_transport_uses() -> None:
    # a key lands in the same partition number on Redis (which takes this hash modulo the
    # partitions in its publish script) and NATS (its router): fixed values, so a change of the
    # hash cannot pass unnoticed
    plain = new_envelope("T", {}, source="s", correlation_id="tx-1")
    keyed = new_envelope("T", {}, source="s", correlation_id="other").evolve(
        extensions={"partitionkey": "tx-1"}
    )
    assert partition_hash(encode(plain), "id") == 3993996266
    assert partition_hash(encode(keyed), "id") == 3993996266
    assert partition_hash(b"not json", "event-7") == 3638367617  # the event id, then
