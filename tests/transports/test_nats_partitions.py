"""Key-partitioned groups on NATS (``partitioned=``) beyond what the conformance suite checks
(``tests/conformance/test_across_members.py``): the options, where a message lands, the
partitions shared out and moving, retries and replayed dead letters in their partition, members
that disagree refused, and plain groups and foreign publishers untouched."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import nats
import pytest

from choreograph.envelope import Envelope, encode, partition_hash
from choreograph.errors import ConfigurationError
from choreograph.transport import Delivery, Failure, Message, transport_from_url
from choreograph.transports.nats import NatsTransport
from choreograph.transports.nats._partitions import PartitionedSubscription
from tests.support.brokers import NATS
from tests.support.partitions import receive, shared_out, until

pytestmark = pytest.mark.nats
SERVER = "nats://127.0.0.1:4222"

Factory = Callable[..., Awaitable[NatsTransport]]


def keyed(topic: str, key: str, partitionkey: str | None = None) -> Message:
    """An event of transaction ``key`` (and an explicit ``partitionkey`` when given)."""
    extensions = {"partitionkey": partitionkey} if partitionkey else {}
    envelope = Envelope(
        id=uuid.uuid4().hex, type=topic, source="test", correlationid=key, data={},
        extensions=extensions,
    )  # fmt: skip
    return Message(envelope.id, topic, encode(envelope))


def name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def partition_of(delivery: Delivery) -> int:
    """The partition a delivery came from: its consumer (``<group>~~<p>``) in its ack subject."""
    tokens = delivery.handle.reply.split(".")
    consumer = tokens[3] if len(tokens) == 9 else tokens[5]
    return int(consumer.rpartition("~")[2])


def stream_sequence(delivery: Delivery) -> int:
    tokens = delivery.handle.reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


@pytest.fixture
def shared_url(namespace: str) -> Iterator[str]:
    NATS.require()
    yield f"{SERVER}?namespace={namespace}"


@pytest.fixture
async def make(shared_url: str) -> AsyncIterator[Factory]:
    opened: list[NatsTransport] = []

    async def make(**options: object) -> NatsTransport:
        url = shared_url + "".join(f"&{key}={value}" for key, value in options.items())
        transport = NatsTransport.from_url(url)
        await transport.connect()
        opened.append(transport)
        return transport

    yield make
    for transport in reversed(opened):
        await transport.close()
    if opened:
        async with NatsTransport.from_url(shared_url) as cleaner:
            await cleaner.delete_namespace()


def test_partitioned_names_groups_and_partitions_are_bounded() -> None:
    url = f"{SERVER}?partitioned=fleet,+billing&partitions=4"
    bus = transport_from_url(url)
    assert bus.settings.partitioned_groups == frozenset({"fleet", "billing"})  # type: ignore[attr-defined]
    assert bus.orders_across_members("fleet") and not bus.orders_across_members("other")
    assert not transport_from_url(SERVER).orders_across_members("fleet")
    with pytest.raises(ConfigurationError, match="invalid group"):
        transport_from_url(f"{SERVER}?partitioned=fleet,bad.name")
    with pytest.raises(ConfigurationError, match="partitions"):
        transport_from_url(f"{SERVER}?partitioned=fleet&partitions=0")


async def test_members_must_agree_on_a_groups_partitions(make: Factory) -> None:
    # given a group declared with 4 partitions
    group = name("g")
    await (await make(partitioned=group, partitions=4)).declare_group(group, ["T"])

    # then declaring it with another number, or not partitioned, is refused
    with pytest.raises(ConfigurationError, match="4 partitions"):
        await (await make(partitioned=group, partitions=8)).declare_group(group, ["T"])
    with pytest.raises(ConfigurationError, match="4 partitions"):
        await (await make()).subscribe(group, ["T"])


async def test_a_keys_events_land_in_one_partition_the_partitionkey_first(make: Factory) -> None:
    # given a partitioned group with one member, which holds every partition
    group = name("g")
    bus = await make(partitioned=group, partitions=8)
    sub = await bus.subscribe(group, ["T", "U"])
    assert isinstance(sub, PartitionedSubscription)
    assert sub.partitions == list(range(8)) and sub.routes

    # when events of several transactions are published on two topics, some with a
    # partitionkey of their own
    sent = [keyed("TU"[i % 2], f"tx{i % 5}") for i in range(40)]
    sent += [keyed("T", f"other{i}", partitionkey="tx0") for i in range(5)]
    await bus.publish(sent)
    got = await receive(sub, len(sent))
    await sub.ack(got)

    # then each key's events came from one partition (the one its hash gives), whatever their
    # topic, the partitionkey's over the correlation id
    key_of = {m.id: (f"tx{i % 5}" if i < 40 else "tx0") for i, m in enumerate(sent)}
    partitions: dict[str, set[int]] = {}
    for delivery in got:
        partitions.setdefault(key_of[delivery.message.id], set()).add(partition_of(delivery))
        assert delivery.message.topic in ("T", "U") and delivery.attempt == 1
    assert partitions == {key: {partition_hash(keyed("T", key).body, "") % 8} for key in partitions}
    assert len(set().union(*partitions.values())) > 1  # and different keys spread
    assert sorted(d.message.id for d in got) == sorted(m.id for m in sent)  # each once
    assert await bus.lag(group) == 0


async def test_partitions_are_shared_out_and_move_when_a_member_leaves(make: Factory) -> None:
    # given three members of a group of 8 partitions
    group = name("g")
    subs = [
        await (await make(partitioned=group, partitions=8)).subscribe(group, ["T"], lease=5)
        for _ in range(3)
    ]
    held = [s for s in subs if isinstance(s, PartitionedSubscription)]

    # then they hold 3, 3 and 2 partitions, none twice, and one of them routes
    await until(lambda: shared_out(held, [2, 3, 3]))
    assert sum(member.routes for member in held) == 1

    # and when one leaves (the router among them, if it was), the two others take its partitions
    leaving = next(member for member in held if member.routes)
    await leaving.close()
    others = [member for member in held if member is not leaving]
    await until(lambda: shared_out(others, [4, 4]))

    async def routed() -> bool:
        await others[0].receive(1, 0.05)
        return sum(member.routes for member in others) == 1

    await until(routed)


async def test_retries_and_replayed_dead_letters_stay_in_their_partition(make: Factory) -> None:
    # given a partitioned group and one event received by its member
    group = name("g")
    bus = await make(partitioned=group, partitions=8)
    sub = await bus.subscribe(group, ["T"])
    sent = keyed("T", "tx-retried")
    await bus.publish([sent])
    [first] = await receive(sub, 1)
    partition = partition_of(first)

    # when it is retried after a delay, then dead-lettered, then replayed
    await sub.retry(first, 0.2)
    [second] = await receive(sub, 1)
    # the same message of the partition again (its attempt is 2, except now and then on
    # nats-server 2.9.10, plain groups alike, where a delayed nak's redelivery reports 1)
    assert (second.message.id, partition_of(second)) == (sent.id, partition)
    assert stream_sequence(second) == stream_sequence(first)
    await sub.dead_letter(second, Failure("test", "Error", "dead"))
    [letter] = await bus.dead_letters(group)
    assert letter.message.id == sent.id and letter.message.topic == "T"
    assert await bus.replay(letter.id)
    [third] = await receive(sub, 1)

    # then it came back each time, to the partition its key goes to
    assert (third.message.id, third.attempt, partition_of(third)) == (sent.id, 1, partition)
    await sub.ack([third])
    assert await bus.lag(group) == 0


async def test_plain_groups_and_other_clients_are_untouched(make: Factory, namespace: str) -> None:
    # given a partitioned group and a plain group of one topic, and a publisher told nothing
    partitioned, plain = name("p"), name("q")
    member = await make(partitioned=partitioned, partitions=4)
    psub = await member.subscribe(partitioned, ["T"])
    qsub = await (await make()).subscribe(plain, ["T"])
    publisher = await make()

    # when it publishes, and so does a client of its own on the documented subject
    sent = [keyed("T", "tx-a"), keyed("T", "tx-b")]
    await publisher.publish(sent)
    foreign = keyed("T", "tx-a")
    nc = await nats.connect(SERVER)
    try:
        js = nc.jetstream()
        await js.publish(f"{namespace}.ev.T", foreign.body, headers={"Nats-Msg-Id": foreign.id})
    finally:
        await nc.close()

    # then both groups receive all three, the plain one from the topic's subject as before
    ids = sorted(m.id for m in [*sent, foreign])
    plain_got = await receive(qsub, 3)
    assert sorted(d.message.id for d in plain_got) == ids
    assert {d.handle.subject for d in plain_got} == {f"{namespace}.ev.T"}
    partitioned_got = await receive(psub, 3)
    assert sorted(d.message.id for d in partitioned_got) == ids
    by_id = {d.message.id: partition_of(d) for d in partitioned_got}
    assert by_id[foreign.id] == by_id[sent[0].id]  # the foreign one with its key's


async def test_a_router_crash_routes_each_message_once(make: Factory, namespace: str) -> None:
    # given a partitioned group whose router moved messages into their partitions but did not
    # acknowledge them (it died): they are delivered to the next router
    group = name("g")
    bus = await make(partitioned=group, partitions=4)
    await bus.declare_group(group, ["T"])
    sent = [keyed("T", f"tx{i}") for i in range(6)]
    await bus.publish(sent)
    nc = await nats.connect(SERVER)
    try:
        js = nc.jetstream()
        pulled = await js.pull_subscribe_bind(f"{group}~T", f"{namespace}_events")
        msgs = await pulled.fetch(6, timeout=5)
        for msg in msgs:  # what a router does, short of the ack
            route = {"Nats-Msg-Id": f"p/{group}/{msg.metadata.sequence.stream}",
                     "Choreograph-Id": json.dumps(msg.headers["Nats-Msg-Id"])}  # fmt: skip
            p = partition_hash(msg.data, "") % 4
            await js.publish(f"{namespace}.grp.{group}~{p}.T", msg.data, headers=route)
            await msg.nak()
    finally:
        await nc.close()

    # when a member joins and routes them again
    sub = await bus.subscribe(group, ["T"])
    got = await receive(sub, 6)
    await sub.ack(got)

    # then each was stored in its partition once: nothing more comes
    assert sorted(d.message.id for d in got) == sorted(m.id for m in sent)
    assert await sub.receive(10, 1.0) == []
    assert await bus.lag(group) == 0


async def test_a_plain_group_made_partitioned_keeps_its_backlog_then_refuses_plain_members(
    make: Factory,
) -> None:
    # given a plain group with a backlog (its members stopped)
    group = name("g")
    plain = await make()
    await plain.declare_group(group, ["T"])
    backlog = [keyed("T", f"tx{i}") for i in range(3)]
    await plain.publish(backlog)

    # when a member starts with the group partitioned
    sub = await (await make(partitioned=group, partitions=4)).subscribe(group, ["T"])

    # then it receives the backlog through the partitions, and a plain member is refused
    got = await receive(sub, 3)
    assert sorted(d.message.id for d in got) == sorted(m.id for m in backlog)
    assert all(partition_of(d) == partition_hash(d.message.body, "") % 4 for d in got)
    with pytest.raises(ConfigurationError, match="4 partitions"):
        await (await make()).subscribe(group, ["T"])


async def test_a_foreign_message_too_big_to_route_is_dead_lettered(
    make: Factory, namespace: str
) -> None:
    # given a partitioned group, and another client publishing a message over the transport's
    # limit (under the server's) beside a good one
    group = name("g")
    bus = await make(partitioned=group, partitions=4)
    sub = await bus.subscribe(group, ["T"])
    big = b'{"x":"' + b"y" * (bus.max_message_bytes + 100) + b'"}'
    good = keyed("T", "tx-good")
    nc = await nats.connect(SERVER)
    try:
        js = nc.jetstream()
        await js.publish(f"{namespace}.ev.T", big, headers={"Nats-Msg-Id": "big-1"})
        await js.publish(f"{namespace}.ev.T", good.body, headers={"Nats-Msg-Id": good.id})
    finally:
        await nc.close()

    # then the good one reaches the member, and the big one its group's dead letters by
    # reference, instead of stopping the router
    [got] = await receive(sub, 1)
    assert got.message.id == good.id
    [letter] = await bus.dead_letters(group)
    assert letter.message.id == "big-1" and json.loads(letter.message.body)["oversized"]
