"""The ``ordered_by`` declaration, and the sequencer's rules on their own (the behaviour on every
transport is in ``tests/conformance/test_ordering.py``)."""

from __future__ import annotations

import uuid

import pytest

from choreograph import App, Context, Event, RetryLater, Service
from choreograph.clock import VirtualClock
from choreograph.envelope import Envelope, encode
from choreograph.errors import ConfigurationError
from choreograph.runtime.ordering import Sequencer, key_reader, ordering_fields, sequencer_for
from choreograph.service import CORRELATION
from choreograph.testing import Harness
from choreograph.transport import Delivery, Message


class Moved(Event):
    delivery_id: str
    leg: int


class Noted(Event):
    text: str


def delivery(data: dict[str, object], *, type_: str = "Moved", attempt: int = 1) -> Delivery:
    envelope = Envelope(
        id=str(uuid.uuid4()), type=type_, source="test", correlationid="corr-1", data=data
    )
    return Delivery(Message(envelope.id, envelope.type, encode(envelope)), attempt)


def test_ordered_by_an_unknown_field_fails_at_declaration_naming_it() -> None:
    service = Service("fleet")
    with pytest.raises(ConfigurationError, match=r"'drone_id' is not a field of Moved") as err:
        service.on(Moved, ordered_by="drone_id")
    assert "delivery_id, leg" in str(err.value)


def test_ordered_by_a_field_or_the_correlation_id_is_declared() -> None:
    service = Service("fleet")

    @service.on(Moved, ordered_by="delivery_id")
    async def move(event: Moved, ctx: Context) -> None: ...

    @service.on(Noted, ordered_by=CORRELATION)
    async def note(event: Noted, ctx: Context) -> None: ...

    assert ordering_fields(service) == {"Moved": "delivery_id", "Noted": CORRELATION}


def test_a_service_without_ordered_handlers_has_no_sequencer() -> None:
    service = Service("fleet")

    @service.on(Moved)
    async def move(event: Moved, ctx: Context) -> None: ...

    assert sequencer_for(service, capacity=10, lease=30) is None


def test_keys_are_read_from_the_field_or_the_correlation_id() -> None:
    key_of = key_reader({"Moved": "leg", "Noted": CORRELATION})
    assert key_of(delivery({"delivery_id": "d1", "leg": 3})) == "3"
    assert key_of(delivery({"text": "x"}, type_="Noted")) == "corr-1"
    # not ordered: another type, a missing field, a body that is not an event
    assert key_of(delivery({"x": 1}, type_="Other")) is None
    assert key_of(delivery({"delivery_id": "d1"})) is None
    assert key_of(Delivery(Message("m", "Moved", b"\xff not json"), 1)) is None


def sequencer() -> Sequencer:
    return Sequencer(key_reader({"Moved": "delivery_id"}), capacity=100, lease=30)


def test_one_delivery_per_key_is_out_at_a_time_and_others_go_past() -> None:
    # given two deliveries of key a, then one of b, and one without a key
    seq = sequencer()
    a1, a2 = delivery({"delivery_id": "a", "leg": 1}), delivery({"delivery_id": "a", "leg": 2})
    b1, free = delivery({"delivery_id": "b", "leg": 1}), delivery({"text": "x"}, type_="Noted")
    seq.add([a1, a2, b1, free])

    # when lanes take batches, then a's second waits until its first is done
    assert seq.take(10) == [a1, b1, free]
    assert seq.take(10) == []
    seq.done([a1], {}, committed=True)
    assert seq.take(10) == [a2]
    assert seq.waiting == 0


def test_a_retried_delivery_goes_before_the_later_ones_of_its_key() -> None:
    # given a1 taken and retried while a2 waits
    seq = sequencer()
    a1, a2 = delivery({"delivery_id": "a", "leg": 1}), delivery({"delivery_id": "a", "leg": 2})
    seq.add([a1, a2])
    assert seq.take(10) == [a1]
    seq.done([a1], {a1.message.id: 20.0}, committed=True)  # over half the lease: parked

    # then a2 waits for a1's return, even once a1 comes back behind it
    assert seq.take(10) == []
    again = Delivery(a1.message, attempt=2)
    seq.add([again])
    assert seq.take(10) == [again]
    seq.done([again], {}, committed=True)
    assert seq.take(10) == [a2]


async def test_a_short_retry_is_kept_in_front_of_its_key_until_due() -> None:
    # given a1 taken and retried after 2 s (at most half the lease: kept here) while a2 waits
    clock = VirtualClock()
    seq = Sequencer(key_reader({"Moved": "delivery_id"}), capacity=100, lease=30, clock=clock)
    a1, a2 = delivery({"delivery_id": "a", "leg": 1}), delivery({"delivery_id": "a", "leg": 2})
    b1 = delivery({"delivery_id": "b", "leg": 1})
    seq.add([a1, a2])
    assert seq.take(10) == [a1]
    assert seq.done([a1], {a1.message.id: 2.0}, committed=True) == {a1.message.id}
    seq.add([b1])

    # then before the delay only b goes, and a lane would wait 2 s at most
    assert seq.take(10) == [b1]
    assert seq.due_in(60) == 2.0

    # and once it is due, a1 goes again as its next attempt, before a2
    await clock.advance(2)
    [again] = seq.take(10)
    assert (again.message.id, again.attempt) == (a1.message.id, 2)
    seq.done([again], {}, committed=True)
    assert seq.take(10) == [a2]


def test_a_copy_received_while_waiting_replaces_the_first_in_its_place() -> None:
    # given a1 in flight, a2 waiting, then a2 received again (its lease ran out)
    seq = sequencer()
    a1, a2 = delivery({"delivery_id": "a", "leg": 1}), delivery({"delivery_id": "a", "leg": 2})
    seq.add([a1, a2])
    assert seq.take(10) == [a1]
    copy = Delivery(a2.message, attempt=2)
    seq.add([copy])

    # then one a2 waits, the newest copy, and goes once a1 is done
    assert seq.waiting == 1
    seq.done([a1], {}, committed=True)
    assert seq.take(10) == [copy]


async def test_the_harness_runs_an_ordered_service_with_a_delayed_retry() -> None:
    # given an ordered service whose first leg of d1 asks to be retried 2 s later, once
    handled: list[int] = []
    service = Service("fleet")

    @service.on(Moved, ordered_by="delivery_id")
    async def move(event: Moved, ctx: Context) -> None:
        if event.leg == 1 and ctx.attempt == 1:
            raise RetryLater("not yet", delay=2)
        handled.append(event.leg)

    async with Harness(App("fleet", [service])) as h:
        # when legs 1 and 2 of d1 are published
        await h.publish(Moved(delivery_id="d1", leg=1))
        await h.publish(Moved(delivery_id="d1", leg=2))
        await h.settle()

        # then leg 2 waits for leg 1's retry, which comes once virtual time passes
        assert handled == []
        await h.advance(2.5)
        assert handled == [1, 2]
