"""The payload limit end to end: a body over ``max_message_bytes`` is dead-lettered by reference
(never sent, never failing its batch); a body right at the limit is published, dead-lettered with
a long failure text and replayed intact (the fields and headers the transport adds still fit)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import orjson
import pytest

from choreograph.errors import PayloadTooLarge
from choreograph.transport import OVERSIZED_HEAD_BYTES, DeadLetter, Failure, Transport
from tests.conformance._helpers import ids, message, receive_for, receive_n, unique
from tests.conftest import TransportFactory


async def _dead_letters_of(
    bus: Transport, group: str, count: int, within: float = 10.0
) -> list[DeadLetter]:
    """Poll until ``group`` has ``count`` dead letters (a transport may write them as a member
    receives); return what is there then."""
    deadline = time.monotonic() + within
    found = await bus.dead_letters(group)
    while len(found) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        found = await bus.dead_letters(group)
    return found


async def test_an_oversized_body_is_dead_lettered_by_reference_and_the_batch_goes_on(
    make_transport: TransportFactory,
) -> None:
    # given two groups on a topic, and a batch holding one body over the transport's limit
    bus = await make_transport()
    topic = unique("topic")
    group_a, group_b = unique("ga"), unique("gb")
    sub_a = await bus.subscribe(group_a, [topic])
    sub_b = await bus.subscribe(group_b, [topic])
    before, after = message(topic), message(topic)
    big = message(topic, b"{" + os.urandom(bus.max_message_bytes))

    # when the batch is published, then it does not raise
    await bus.publish([before, big, after])

    # and every group receives the messages that fit, and not the big one
    for sub in (sub_a, sub_b):
        got = await receive_n(sub, 2, within=10)
        assert sorted(ids(got)) == sorted([before.id, after.id])
        await sub.ack(got)
        assert await receive_for(sub, 0.3) == []

    # and each group holds it as a dead letter: the reason, a digest, its head, not its body
    digest = hashlib.sha256(big.body).hexdigest()
    for group in (group_a, group_b):
        [dead] = await _dead_letters_of(bus, group, 1)
        assert (dead.group, dead.message.id, dead.message.topic) == (group, big.id, topic)
        assert dead.failure.reason == "payload too large"
        assert dead.failure.error_type == "PayloadTooLarge"
        assert digest in dead.failure.error and str(len(big.body)) in dead.failure.error
        reference = orjson.loads(dead.message.body)
        assert reference["oversized"] is True
        assert (reference["bytes"], reference["sha256"]) == (len(big.body), digest)
        assert reference["limit"] == bus.max_message_bytes
        head = big.body[:OVERSIZED_HEAD_BYTES].decode("utf-8", errors="replace")
        assert reference["head"].startswith("{") and head.startswith(reference["head"][:-1])
        assert len(dead.message.body) <= 4096


async def test_an_oversized_replay_target_is_dead_lettered_for_its_group_only(
    make_transport: TransportFactory,
) -> None:
    # given two groups on a topic, and an oversized message addressed to one group only
    bus = await make_transport()
    topic = unique("topic")
    group_a, group_b = unique("ga"), unique("gb")
    sub_a = await bus.subscribe(group_a, [topic])
    sub_b = await bus.subscribe(group_b, [topic])
    big = message(topic, b"x" * (bus.max_message_bytes + 1), group=group_a)

    # when it is published
    await bus.publish([big])

    # then nothing is delivered, the target group holds its reference and the other group nothing
    assert await receive_for(sub_a, 0.3) == []
    assert await receive_for(sub_b, 0.3) == []
    [dead] = await _dead_letters_of(bus, group_a, 1)
    assert dead.message.id == big.id
    assert await bus.dead_letters(group_b) == []


async def test_a_body_at_the_limit_is_delivered_dead_lettered_and_replayed_intact(
    make_transport: TransportFactory,
) -> None:
    # given a subscribed group
    bus = await make_transport()
    topic, group = unique("topic"), unique("g")
    sub = await bus.subscribe(group, [topic])

    # when a body of exactly max_message_bytes is published
    sent = message(topic, os.urandom(bus.max_message_bytes))  # binary, every byte value
    await bus.publish([sent])

    # then it is received intact
    [got] = await receive_n(sub, 1, within=10)
    assert got.message.id == sent.id
    assert got.message.body == sent.body

    # when it is dead-lettered with a long failure text, its dead letter keeps the body intact
    await sub.dead_letter(got, Failure("handler error", "ValueError", "e" * 200_000))
    [dead] = await _dead_letters_of(bus, group, 1)
    assert dead.message.body == sent.body
    assert dead.failure.reason == "handler error"
    assert dead.failure.error.startswith("e" * 100)

    # and when it is replayed, it comes back intact, as a first attempt
    assert await bus.replay(dead.id)
    [again] = await receive_n(sub, 1, within=10)
    assert (again.message.id, again.attempt) == (sent.id, 1)
    assert again.message.body == sent.body
    await sub.ack([again])
    assert await bus.dead_letters(group) == []


async def test_a_reference_is_replayed_with_a_corrected_body_and_not_with_an_oversized_one(
    make_transport: TransportFactory,
) -> None:
    # given an oversized message dead-lettered by reference
    bus = await make_transport()
    topic, group = unique("topic"), unique("g")
    sub = await bus.subscribe(group, [topic])
    big = message(topic, b"y" * (bus.max_message_bytes + 100))
    await bus.publish([big])
    assert await receive_for(sub, 0.3) == []  # (on RabbitMQ, receiving it dead-letters it)
    [dead] = await _dead_letters_of(bus, group, 1)

    # when it is replayed with a body still over the limit, then it is refused and kept
    with pytest.raises(PayloadTooLarge):
        await bus.replay(dead.id, body=big.body)
    assert [d.id for d in await bus.dead_letters(group)] == [dead.id]

    # when it is replayed with a corrected body, then the group receives that
    assert await bus.replay(dead.id, body=b"corrected")
    [got] = await receive_n(sub, 1, within=10)
    assert (got.message.id, got.message.body) == (big.id, b"corrected")
    await sub.ack([got])
    assert await bus.dead_letters(group) == []
