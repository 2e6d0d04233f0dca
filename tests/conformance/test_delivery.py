"""Members of a group: competition, ack, leases, closing, batches."""

from __future__ import annotations

import asyncio
from collections import Counter

from choreograph.transport import Subscription
from tests.conformance._helpers import ids, message, messages, receive_for, receive_n, unique
from tests.conftest import TransportFactory


async def test_members_of_a_group_share_messages_without_duplicates(
    make_transport: TransportFactory,
) -> None:
    # given two members of one group, each on its own connection
    group, topic = unique("g"), unique("topic")
    first = await (await make_transport()).subscribe(group, [topic])
    second = await (await make_transport()).subscribe(group, [topic])
    sent = messages(topic, 200)

    # when 200 messages are published and both members receive and ack concurrently
    seen: list[str] = []

    async def consume(sub: Subscription) -> None:
        idle = 0
        while len(seen) < len(sent) and idle < 10:
            got = await sub.receive(20, 0.3)
            idle = 0 if got else idle + 1
            seen.extend(ids(got))
            await sub.ack(got)

    await (await make_transport()).publish(sent)
    await asyncio.gather(consume(first), consume(second))
    seen.extend(ids(await receive_for(first, 0.3)) + ids(await receive_for(second, 0.3)))

    # then together they received each message exactly once
    duplicates = [i for i, n in Counter(seen).items() if n > 1]
    assert duplicates == []
    assert sorted(seen) == sorted(ids(sent))


async def test_acked_message_never_comes_back(make_transport: TransportFactory) -> None:
    # given a member with a short lease that received a message
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    sub = await bus.subscribe(group, [topic], lease=1.0)
    await bus.publish([message(topic)])
    got = await receive_n(sub, 1, within=5)
    assert len(got) == 1

    # when it acks the message
    await sub.ack(got)

    # then neither it nor another member gets it again, even after the lease
    other = await (await make_transport()).subscribe(group, [topic], lease=1.0)
    assert await receive_for(sub, 1.5) == []
    assert await receive_for(other, 0.2) == []


async def test_unacked_message_comes_back_after_its_lease(
    make_transport: TransportFactory,
) -> None:
    # given member A holding a message without settling it, lease 1.5 s
    group, topic = unique("g"), unique("topic")
    a = await (await make_transport()).subscribe(group, [topic], lease=1.5)
    sent = message(topic)
    await (await make_transport()).publish([sent])
    held = await receive_n(a, 1, within=5)
    assert [d.attempt for d in held] == [1]
    b = await (await make_transport()).subscribe(group, [topic], lease=1.5)

    # then member B does not get it while the lease runs
    assert await receive_for(b, 0.7) == []

    # when the lease has run out, then B gets it, as attempt 2
    again = await receive_n(b, 1, within=5)
    assert ids(again) == [sent.id]
    assert again[0].attempt == 2
    assert again[0].message.body == sent.body
    await b.ack(again)


# The attempt a given-back message carries (docs/transports.md, "close() gives back").
GIVEN_BACK_ATTEMPT = {"memory": 1, "sqlite": 2, "nats": 2, "amqp": 1, "redis": 1}
LONG_LEASE = 60.0


async def test_closed_subscription_gives_back_its_unacked_deliveries(
    make_transport: TransportFactory, transport_name: str
) -> None:
    # given member A holding three messages under a lease far longer than the test waits, so
    # only a give-back (not the lease running out) can bring them back
    group, topic = unique("g"), unique("topic")
    a = await (await make_transport()).subscribe(group, [topic], lease=LONG_LEASE)
    sent = messages(topic, 3)
    await (await make_transport()).publish(sent)
    held = await receive_n(a, 3, within=10)
    assert [d.attempt for d in held] == [1, 1, 1]

    # when A closes without settling them
    await a.close()

    # then member B receives them well before A's lease would have run out, with the attempt
    # number the transport documents for a give-back
    b = await (await make_transport()).subscribe(group, [topic], lease=LONG_LEASE)
    got = await receive_n(b, 3, within=LONG_LEASE / 2)
    assert sorted(ids(got)) == sorted(ids(sent))
    expected = GIVEN_BACK_ATTEMPT[transport_name]
    assert [d.attempt for d in got] == [expected] * 3
    await b.ack(got)


async def test_a_thousand_messages_in_batches(make_transport: TransportFactory) -> None:
    # given a group and 1,000 messages
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    sub = await (await make_transport()).subscribe(group, [topic])
    sent = messages(topic, 1000)

    # when they are published in batches of 100, received up to 100 at a time and acked per batch
    for start in range(0, len(sent), 100):
        await bus.publish(sent[start : start + 100])
    seen: list[str] = []
    for _ in range(200):
        got = await sub.receive(100, 1.0)
        assert len(got) <= 100
        seen.extend(ids(got))
        await sub.ack(got)
        if len(seen) >= len(sent):
            break
    await sub.ack([])  # an empty ack is a no-op

    # then every message was seen exactly once, and nothing more comes
    assert len(seen) == len(set(seen))
    assert sorted(seen) == sorted(ids(sent))
    assert await receive_for(sub, 0.3) == []
