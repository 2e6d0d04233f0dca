"""Retry after a delay: not early, not lost, attempt + 1, and never blocking the other messages."""

from __future__ import annotations

import time

from choreograph.transport import Delivery
from tests.conformance._helpers import ids, message, receive_for, receive_n, unique
from tests.conftest import TransportFactory

DELAY = 2.0


async def test_retry_waits_for_its_delay_while_other_messages_flow(
    make_transport: TransportFactory,
) -> None:
    # given a member that received a message
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    sub = await bus.subscribe(group, [topic], lease=30)
    first = message(topic)
    await bus.publish([first])
    [delivery] = await receive_n(sub, 1, within=5)

    # when it retries the message after DELAY s, and another message is published meanwhile
    await sub.retry(delivery, DELAY)
    retried_at = time.monotonic()
    second = message(topic)
    await bus.publish([second])

    # then the other message arrives first (no head-of-line blocking), and the retried one only
    # once its delay has passed, as attempt 2, body intact (the timeout only guards a hang)
    arrivals: list[tuple[Delivery, float]] = []
    give_up = retried_at + DELAY + 60
    while len(arrivals) < 2 and time.monotonic() < give_up:
        got = await sub.receive(10, 0.5)
        arrivals += [(d, time.monotonic()) for d in got]
        await sub.ack(got)
    assert ids(d for d, _ in arrivals) == [second.id, first.id]
    late, came_back_at = arrivals[1]
    assert came_back_at - retried_at >= DELAY - 0.05
    assert late.attempt == 2
    assert late.message.body == first.body
    assert late.message.topic == topic


async def test_retried_message_goes_to_any_member_of_the_group(
    make_transport: TransportFactory,
) -> None:
    # given member A retrying a message with a short delay
    group, topic = unique("g"), unique("topic")
    a = await (await make_transport()).subscribe(group, [topic], lease=30)
    sent = message(topic)
    await (await make_transport()).publish([sent])
    [delivery] = await receive_n(a, 1, within=5)
    await a.retry(delivery, 0.3)

    # when A closes and member B of the same group receives
    await a.close()
    b = await (await make_transport()).subscribe(group, [topic], lease=30)

    # then B gets the retried message
    got = await receive_n(b, 1, within=5)
    assert ids(got) == [sent.id]
    assert got[0].attempt == 2
    await b.ack(got)


async def test_every_retry_counts_one_more_attempt(make_transport: TransportFactory) -> None:
    # given a message retried twice with a short delay
    bus = await make_transport()
    topic = unique("topic")
    sub = await bus.subscribe(unique("g"), [topic], lease=30)
    sent = message(topic)
    await bus.publish([sent])
    attempts = []
    for _ in range(2):
        [delivery] = await receive_n(sub, 1, within=5)
        attempts.append(delivery.attempt)
        await sub.retry(delivery, 0.2)

    # when it is received a third time
    [delivery] = await receive_n(sub, 1, within=5)
    attempts.append(delivery.attempt)
    await sub.ack([delivery])

    # then the attempts were 1, 2, 3, and it does not come back after the ack
    assert attempts == [1, 2, 3]
    assert await receive_for(sub, 0.5) == []


async def test_retry_goes_to_its_group_only(make_transport: TransportFactory) -> None:
    # given two groups on one topic; A retries the message, B acks it
    bus = await make_transport()
    topic = unique("topic")
    a = await bus.subscribe(unique("ga"), [topic], lease=30)
    b = await bus.subscribe(unique("gb"), [topic], lease=30)
    sent = message(topic)
    await bus.publish([sent])
    [for_a] = await receive_n(a, 1, within=5)
    await b.ack(await receive_n(b, 1, within=5))

    # when A's retry comes due
    await a.retry(for_a, 0.2)

    # then A gets it again and B does not
    assert ids(await receive_n(a, 1, within=5)) == [sent.id]
    assert await receive_for(b, 0.5) == []
