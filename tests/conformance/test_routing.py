"""Who gets what: publish, fan-out to groups, declared topics, targeted messages, lag."""

from __future__ import annotations

import asyncio
import time

from choreograph.transport import Transport
from tests.conformance._helpers import ids, message, messages, receive_for, receive_n, unique
from tests.conftest import TransportFactory


async def test_published_message_is_received(make_transport: TransportFactory) -> None:
    # given a group subscribed to a topic
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    sub = await bus.subscribe(group, [topic])
    sent = message(topic, b'{"hello": "world"}')

    # when a message is published
    await bus.publish([sent])

    # then the group receives it whole, as a first attempt
    [got] = await receive_n(sub, 1, within=5)
    assert got.message.id == sent.id
    assert got.message.topic == topic
    assert got.message.body == b'{"hello": "world"}'
    assert got.attempt == 1
    await sub.ack([got])


async def test_every_group_gets_every_message_of_its_topics(
    make_transport: TransportFactory,
) -> None:
    # given two groups subscribed to the same topic
    bus = await make_transport()
    topic = unique("topic")
    first = await bus.subscribe(unique("g1"), [topic])
    second = await bus.subscribe(unique("g2"), [topic])

    # when ten messages are published
    sent = messages(topic, 10)
    await bus.publish(sent)

    # then each group receives all ten
    for sub in (first, second):
        got = await receive_n(sub, 10, within=5)
        assert sorted(ids(got)) == sorted(ids(sent))
        await sub.ack(got)


async def test_group_receives_several_topics(make_transport: TransportFactory) -> None:
    # given a group subscribed to two topics
    bus = await make_transport()
    one, two = unique("topic1"), unique("topic2")
    sub = await bus.subscribe(unique("g"), [one, two])

    # when a message of each is published
    sent = [message(one), message(two)]
    await bus.publish(sent)

    # then the group receives both, each under its topic
    got = await receive_n(sub, 2, within=5)
    assert sorted((d.message.id, d.message.topic) for d in got) == sorted(
        (m.id, m.topic) for m in sent
    )
    await sub.ack(got)


async def test_group_does_not_get_topics_it_did_not_declare(
    make_transport: TransportFactory,
) -> None:
    # given group A on topic 1, and group B on topic 2
    bus = await make_transport()
    one, two = unique("topic1"), unique("topic2")
    a = await bus.subscribe(unique("ga"), [one])
    b = await bus.subscribe(unique("gb"), [two])

    # when a message of topic 2 is published
    sent = message(two)
    await bus.publish([sent])

    # then B gets it and A gets nothing
    assert ids(await receive_n(b, 1, within=5)) == [sent.id]
    assert await receive_for(a, 0.5) == []


async def test_group_declared_after_a_publish_does_not_see_it(
    make_transport: TransportFactory,
) -> None:
    # given a message published while only group A had declared its topic
    bus = await make_transport()
    topic = unique("topic")
    await bus.declare_group(unique("ga"), [topic])
    old = message(topic)
    await bus.publish([old])

    # when group B is declared afterwards, and a new message is published
    late = await bus.subscribe(unique("gb"), [topic])
    new = message(topic)
    await bus.publish([new])

    # then B receives the new message only
    got = await receive_n(late, 1, within=5)
    got += await receive_for(late, 0.5)
    assert ids(got) == [new.id]


async def test_declared_group_keeps_messages_until_a_member_runs(
    make_transport: TransportFactory,
) -> None:
    # given a group declared, with no member running
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    await bus.declare_group(group, [topic])

    # when messages are published, and only then a member subscribes (on another connection)
    sent = messages(topic, 3)
    await bus.publish(sent)
    member = await (await make_transport()).subscribe(group, [topic])

    # then the member receives them all
    got = await receive_n(member, 3, within=5)
    assert sorted(ids(got)) == sorted(ids(sent))
    await member.ack(got)


async def test_declare_group_is_additive_and_idempotent(make_transport: TransportFactory) -> None:
    # given a group declared on topic 1, then on topic 2, then on topic 1 again
    bus = await make_transport()
    group, one, two = unique("g"), unique("topic1"), unique("topic2")
    await bus.declare_group(group, [one])
    await bus.declare_group(group, [two])
    await bus.declare_group(group, [one])

    # when one message of each topic is published
    sent = [message(one), message(two)]
    await bus.publish(sent)

    # then a member of the group receives both, once each
    sub = await bus.subscribe(group, [one, two])
    got = await receive_n(sub, 2, within=5)
    got += await receive_for(sub, 0.3)
    assert sorted(ids(got)) == sorted(ids(sent))
    await sub.ack(got)


async def test_message_with_a_group_goes_to_that_group_only(
    make_transport: TransportFactory,
) -> None:
    # given two groups subscribed to one topic
    bus = await make_transport()
    topic = unique("topic")
    target_name = unique("target")
    target = await bus.subscribe(target_name, [topic])
    other = await bus.subscribe(unique("other"), [topic])

    # when a message addressed to the first group is published
    sent = message(topic, group=target_name)
    await bus.publish([sent])

    # then only that group receives it
    got = await receive_n(target, 1, within=5)
    assert ids(got) == [sent.id]
    assert await receive_for(other, 0.5) == []
    await target.ack(got)


async def test_connect_is_idempotent(make_transport: TransportFactory) -> None:
    # given a connected transport
    bus = await make_transport()

    # when connect is called again
    await bus.connect()

    # then it still works
    topic = unique("topic")
    sub = await bus.subscribe(unique("g"), [topic])
    sent = message(topic)
    await bus.publish([sent])
    assert ids(await receive_n(sub, 1, within=5)) == [sent.id]


async def test_lag_counts_messages_waiting_for_the_group(make_transport: TransportFactory) -> None:
    # given a declared group with three messages waiting
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    await bus.declare_group(group, [topic])
    await bus.publish(messages(topic, 3))

    # then a transport that reports lag (overrides Transport.lag) says 3; only one that does not
    # may answer None
    if type(bus).lag is Transport.lag:
        assert await bus.lag(group) is None
        return
    assert await _eventually_lag(bus.lag, group, 3) == 3

    # when they are received and acked
    sub = await bus.subscribe(group, [topic])
    await sub.ack(await receive_n(sub, 3, within=5))

    # then lag says 0
    assert await _eventually_lag(bus.lag, group, 0) == 0


async def _eventually_lag(lag: object, group: str, expected: int) -> int | None:
    """Some brokers report counts with a small delay: poll (the timeout only guards a hang)."""
    deadline = time.monotonic() + 15
    while True:
        value: int | None = await lag(group)  # type: ignore[operator]
        if value == expected or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)
