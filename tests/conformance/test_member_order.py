"""What one member receives is in publish order as its transport claims (``member_order``): the
ground ordering per key stands on (``docs/ordering.md``)."""

from __future__ import annotations

from choreograph.transport import Message
from tests.conformance._helpers import ids, message, receive_n, unique
from tests.conftest import TransportFactory


def in_topic(sent: list[Message], topic: str) -> list[str]:
    return [m.id for m in sent if m.topic == topic]


async def test_one_member_receives_in_publish_order_as_claimed(
    make_transport: TransportFactory,
) -> None:
    # given a member of a group of three topics, and 300 messages published in small batches,
    # the topics taking turns
    bus = await make_transport()
    topics = [unique("ta"), unique("tb"), unique("tc")]
    sub = await bus.subscribe(unique("g"), topics, lease=30)
    sent = [message(topics[n % 3]) for n in range(300)]
    for start in range(0, len(sent), 7):
        await bus.publish(sent[start : start + 7])

    # when it receives them all, settling each batch
    got = []
    while len(got) < len(sent):
        batch = await receive_n(sub, len(sent) - len(got), within=30, max_messages=50)
        assert batch, f"{len(sent) - len(got)} messages never came"
        await sub.ack(batch)
        got += batch

    # then they came in publish order: across the topics where the transport claims it, and in
    # each topic always (no built-in transport claims less)
    received = ids(got)
    assert bus.member_order in ("group", "topic")
    if bus.member_order == "group":
        assert received == ids(sent)
    for topic in topics:
        assert [i for i in received if i in set(in_topic(sent, topic))] == in_topic(sent, topic)


async def test_what_a_closing_member_gives_back_comes_first_where_claimed(
    make_transport: TransportFactory,
) -> None:
    # given member A holding the first 5 of 10 messages, and 10 more published behind them
    group, topic = unique("g"), unique("topic")
    bus = await make_transport()
    await bus.declare_group(group, [topic])
    sent = [message(topic) for _ in range(20)]
    await bus.publish(sent[:10])
    a = await (await make_transport()).subscribe(group, [topic], lease=30)
    held = await receive_n(a, 5, within=30, max_messages=5)
    assert len(held) == 5
    await bus.publish(sent[10:])

    # when A closes and member B receives everything
    await a.close()
    b = await bus.subscribe(group, [topic], lease=30)
    got = []
    while len(got) < len(sent):
        batch = await receive_n(b, len(sent) - len(got), within=30)
        assert batch, f"{len(sent) - len(got)} messages never came"
        await b.ack(batch)
        got += batch

    # then nothing is missing, and where the transport claims it, B got them in publish order
    assert sorted(ids(got)) == sorted(ids(sent))
    if bus.gives_back_in_order:
        assert ids(got) == ids(sent)
