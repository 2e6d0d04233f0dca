"""Whatever a message holds, its handling ends handled, retried or dead-lettered with a reason,
and its failure announcement is always bounded (on the in-memory bus)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson
import pytest

from choreograph import App, Context, Event, HandlerFailed, PermanentFailure, RetryPolicy, Service
from choreograph.envelope import MAX_EVENT_BYTES, MAX_ID_CHARS
from choreograph.events import MAX_ANNOUNCEMENT_DEPTH
from choreograph.runtime.announce import LONGEST_ID
from choreograph.testing import Harness
from choreograph.transport import Message

QUICK = RetryPolicy(max_attempts=2, immediate=1, base_delay=0.1, jitter=0)


class Order(Event):
    order_id: str
    amount: int


class Paid(Event):
    order_id: str


def shop(*, failing_audit: bool = False) -> App:
    """payment: Order -> Paid; audit reacts to every HandlerFailed (and, when ``failing_audit``,
    gives up on each one, which announces a failure about a failure)."""
    payment = Service("payment", retry=QUICK)
    audit = Service("audit", retry=QUICK)

    @payment.on(Order, emits=[Paid])
    async def charge(event: Order, ctx: Context) -> Paid:
        return Paid(order_id=event.order_id)

    @audit.on(HandlerFailed)
    async def note_failure(event: HandlerFailed, ctx: Context) -> None:
        if failing_audit:
            raise PermanentFailure(f"cannot audit {event.failed_event_type}")
        await ctx.state.put("failure", event.failed_event_id[:100], {"depth": event.depth})

    return App("shop", [payment, audit])


def body(data: Any, *, event_type: str = "Order", **attributes: Any) -> bytes:
    doc = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "outside",
        "type": event_type,
        "correlationid": "tx-poison",
        "data": data,
        **attributes,
    }
    return json.dumps(doc).encode()  # (the json module encodes deeper nesting than orjson)


def nested(levels: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    inner = doc
    for _ in range(levels):
        inner["x"] = {}
        inner = inner["x"]
    return doc


async def publish_raw(h: Harness, raw: bytes) -> str:
    message_id = str(uuid.uuid4())
    await h.transport.publish([Message(message_id, "Order", raw)])
    return message_id


async def test_data_nested_too_deep_to_encode_is_announced_with_its_short_fields() -> None:
    # given an Order nested 300 levels deep (more than JSON encoding takes) and failing validation
    raw = body({"order_id": "o-deep", "amount": "not a number", "extra": nested(300)})
    async with Harness(shop()) as h:
        # when it arrives, beside a valid order
        await publish_raw(h, raw)
        await h.publish(Order(order_id="o-ok", amount=3), correlation_id="tx-ok")
        await h.wait_for(Paid, correlation_id="tx-ok")
        failed = await h.wait_for(HandlerFailed, correlation_id="tx-poison")
        await h.settle()
        # then it is dead-lettered as a schema violation, and announced with its short fields
        (dead,) = await h.dead_letters("payment")
        assert dead.failure.reason == "schema violation"
        assert "amount" in dead.failure.error
        assert failed.data["data"] == {"order_id": "o-deep", "amount": "not a number"}
        assert failed.data["depth"] == 1


async def test_an_announcement_too_large_in_every_other_form_is_bounded_with_digested_ids() -> None:
    # given an invalid Order just under the size limit, all of it short fields, with a long id
    # and no correlation id (so the transaction is named after that id)
    long_id = "i" * (MAX_ID_CHARS - 10)
    doc = {
        "specversion": "1.0",
        "id": long_id,
        "source": "outside",
        "type": "Order",
        "data": {"order_id": "o-big"},
    }
    n = 0
    while len(raw := orjson.dumps(doc)) < MAX_EVENT_BYTES - 400:
        doc["data"][f"f{n:05d}"] = "v" * min(150, MAX_EVENT_BYTES - 400 - len(raw))
        n += 1
    assert MAX_EVENT_BYTES - 400 <= len(raw) <= MAX_EVENT_BYTES
    async with Harness(shop()) as h:
        # when it arrives
        await publish_raw(h, raw)
        failed = await h.wait_for(HandlerFailed, correlation_id="")
        await h.settle()
        # then its announcement carries no data, and its ids as a head and a digest
        assert failed.data["data"] == {}
        assert failed.data["failed_event_id"].startswith(long_id[:64] + "...sha256:")
        assert len(failed.correlationid) < LONGEST_ID
        assert failed.correlationid == failed.data["failed_event_id"]
        (dead,) = await h.dead_letters("payment")
        assert dead.failure.reason == "schema violation"
        # and the audit service handled the announcement
        assert (await h.state("audit", "failure", failed.data["failed_event_id"][:100])) == {
            "depth": 1
        }


@pytest.mark.parametrize(
    ("attributes", "words"),
    [
        ({"id": "a\x00b"}, "attribute 'id' contains a control character"),
        ({"correlationid": "tx\x00"}, "attribute 'correlationid' contains a control character"),
        ({"traceparent": "00-\x1f"}, "attribute 'traceparent' contains a control character"),
        ({"id": "x" * (MAX_ID_CHARS + 1)}, f"at most {MAX_ID_CHARS}"),
        ({"id": "y" * 180_000}, "attribute 'id' is 180000 characters"),
    ],
)
async def test_ids_no_store_can_key_are_dead_lettered_as_malformed(
    attributes: dict[str, Any], words: str
) -> None:
    # given an otherwise valid Order whose attributes no store can key
    async with Harness(shop()) as h:
        # when it arrives beside a valid order
        await publish_raw(h, body({"order_id": "o-1", "amount": 1}, **attributes))
        await h.publish(Order(order_id="o-ok", amount=3), correlation_id="tx-ok")
        await h.wait_for(Paid, correlation_id="tx-ok")
        await h.settle()
        # then it is dead-lettered with its reason, and nothing is announced
        (dead,) = await h.dead_letters("payment")
        assert dead.failure.reason == "malformed envelope"
        assert words in dead.failure.error
        assert not h.published(HandlerFailed)


async def test_failures_of_failure_handlers_are_announced_to_a_bounded_depth() -> None:
    # given an audit service that gives up on every HandlerFailed it handles
    async with Harness(shop(failing_audit=True)) as h:
        # when one invalid Order starts the chain
        await publish_raw(h, body({"order_id": "o-bad"}))
        await h.advance(30)
        # then the failure is announced at depths 1..MAX, each once, and no deeper
        announced = h.published(HandlerFailed, "tx-poison")
        depths = sorted(e.data["depth"] for e in announced)
        assert depths == list(range(1, MAX_ANNOUNCEMENT_DEPTH + 1))
        # and the deepest one is dead-lettered by audit, saying why it was not announced
        dead = await h.dead_letters("audit")
        assert len(dead) == MAX_ANNOUNCEMENT_DEPTH
        unannounced = [d for d in dead if "not announced" in d.failure.error]
        assert len(unannounced) == 1
        assert orjson.loads(unannounced[0].message.body)["data"]["depth"] == MAX_ANNOUNCEMENT_DEPTH
        assert unannounced[0].failure.reason == "permanent failure"
        # and a later order still flows
        await h.publish(Order(order_id="o-ok", amount=3), correlation_id="tx-ok")
        await h.wait_for(Paid, correlation_id="tx-ok")
