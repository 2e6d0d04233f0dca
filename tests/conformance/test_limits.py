"""The payload limit: refused whole batches, and bodies right at the limit."""

from __future__ import annotations

import os

import pytest

from choreograph.errors import PayloadTooLarge
from tests.conformance._helpers import ids, message, receive_for, receive_n, unique
from tests.conftest import TransportFactory


async def test_oversized_body_refuses_the_whole_batch(make_transport: TransportFactory) -> None:
    # given a subscribed group, and a batch holding one body over the transport's limit
    bus = await make_transport()
    topic = unique("topic")
    sub = await bus.subscribe(unique("g"), [topic])
    small = message(topic)
    big = message(topic, b"x" * (bus.max_message_bytes + 1))

    # when the batch is published, then it raises PayloadTooLarge
    with pytest.raises(PayloadTooLarge):
        await bus.publish([small, big])

    # and nothing of the batch was published
    assert await receive_for(sub, 0.5) == []


async def test_body_at_the_limit_goes_through(make_transport: TransportFactory) -> None:
    # given a subscribed group
    bus = await make_transport()
    topic = unique("topic")
    sub = await bus.subscribe(unique("g"), [topic])

    # when a body of exactly max_message_bytes is published
    sent = message(topic, os.urandom(bus.max_message_bytes))  # binary, every byte value
    await bus.publish([sent])

    # then it is received intact
    got = await receive_n(sub, 1, within=5)
    assert ids(got) == [sent.id]
    assert got[0].message.body == sent.body
    await sub.ack(got)
