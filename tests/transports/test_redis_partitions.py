"""Key-partitioned groups on Redis (``partitioned=``) beyond what the conformance suite checks
(``tests/conformance/test_across_members.py``): the options, where a message lands, the
partitions shared out and moving, retries, dead letters and lag of a partitioned group."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import redis as redis_sync

from choreograph.envelope import Envelope, encode
from choreograph.errors import ConfigurationError
from choreograph.transport import Failure, Message, transport_from_url
from choreograph.transports.redis import RedisTransport
from choreograph.transports.redis._partitions import PartitionedSubscription
from tests.support.brokers import REDIS
from tests.support.partitions import receive, shared_out, until

pytestmark = pytest.mark.redis

Factory = Callable[..., Awaitable[RedisTransport]]


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


@pytest.fixture
def shared_url(namespace: str) -> Iterator[str]:
    REDIS.require()
    yield f"redis://127.0.0.1:6379/0?namespace={namespace}"
    client = redis_sync.Redis(port=6379)
    keys = list(client.scan_iter(f"{{{namespace}}}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
async def make(shared_url: str) -> AsyncIterator[Factory]:
    opened: list[RedisTransport] = []

    async def make(**options: object) -> RedisTransport:
        url = shared_url + "".join(f"&{key}={value}" for key, value in options.items())
        transport = RedisTransport.from_url(url)
        await transport.connect()
        opened.append(transport)
        return transport

    yield make
    for transport in reversed(opened):
        await transport.close()


def test_partitioned_names_groups_and_partitions_are_bounded() -> None:
    url = "redis://127.0.0.1:6379/0?partitioned=fleet,+billing&partitions=4"
    bus = transport_from_url(url)
    assert bus.settings.partitioned_groups == frozenset({"fleet", "billing"})  # type: ignore[attr-defined]
    assert bus.orders_across_members("fleet") and not bus.orders_across_members("other")
    assert not transport_from_url("redis://127.0.0.1:6379/0").orders_across_members("fleet")
    with pytest.raises(ConfigurationError, match="invalid group"):
        transport_from_url("redis://127.0.0.1:6379/0?partitioned=fleet,bad.name")
    with pytest.raises(ConfigurationError, match="partitions"):
        transport_from_url("redis://127.0.0.1:6379/0?partitioned=fleet&partitions=0")


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
    sub = await bus.subscribe(group, ["T"])
    assert isinstance(sub, PartitionedSubscription)
    assert sub.partitions == list(range(8))

    # when events of several transactions are published, some with a partitionkey of their own
    sent = [keyed("T", f"tx{i % 5}") for i in range(40)]
    sent += [keyed("T", f"other{i}", partitionkey="tx0") for i in range(5)]
    await bus.publish(sent)
    got = await receive(sub, len(sent))
    await sub.ack(got)

    # then each key's events came from one partition, the partitionkey's over the correlation id
    partition_of: dict[str, set[int]] = {}
    key_of = {m.id: (f"tx{i % 5}" if i < 40 else "tx0") for i, m in enumerate(sent)}
    for delivery in got:
        partition_of.setdefault(key_of[delivery.message.id], set()).add(delivery.handle[0])
    assert all(len(found) == 1 for found in partition_of.values()), partition_of
    assert len(set().union(*partition_of.values())) > 1  # and different keys spread


async def test_partitions_are_shared_out_and_move_when_a_member_leaves(make: Factory) -> None:
    # given three members of a group of 8 partitions
    group = name("g")
    subs = [
        await (await make(partitioned=group, partitions=8)).subscribe(group, ["T"], lease=5)
        for _ in range(3)
    ]
    held = [s for s in subs if isinstance(s, PartitionedSubscription)]

    # then they hold 3, 3 and 2 partitions, none twice
    await until(lambda: shared_out(held, [2, 3, 3]))

    # and when one leaves, the two others take its partitions
    await held[0].close()
    await until(lambda: shared_out(held[1:], [4, 4]))


async def test_retries_and_replayed_dead_letters_stay_in_their_partition(make: Factory) -> None:
    # given a partitioned group and one event received by its member
    group = name("g")
    bus = await make(partitioned=group, partitions=8)
    sub = await bus.subscribe(group, ["T"])
    assert isinstance(sub, PartitionedSubscription)
    sent = keyed("T", "tx-retried")
    await bus.publish([sent])
    [first] = await receive(sub, 1)
    partition = first.handle[0]
    assert await bus.lag(group) == 0

    # when it is retried after a delay, then dead-lettered, then replayed
    await sub.retry(first, 0.2)
    assert await bus.lag(group) == 1
    [second] = await receive(sub, 1)
    assert (second.message.id, second.attempt, second.handle[0]) == (sent.id, 2, partition)
    await sub.dead_letter(second, Failure("test", "Error", "dead"))
    [letter] = await bus.dead_letters(group)
    assert await bus.replay(letter.id)
    [third] = await receive(sub, 1)

    # then it came back each time, to the partition its key goes to
    assert (third.message.id, third.attempt, third.handle[0]) == (sent.id, 1, partition)
    await sub.ack([third])
    assert await bus.lag(group) == 0


async def test_a_publisher_without_the_options_publishes_into_the_partitions(
    make: Factory,
) -> None:
    # given a partitioned group, its member, and a publisher that was told nothing about it
    group = name("g")
    member = await make(partitioned=group, partitions=4)
    sub = await member.subscribe(group, ["T"])
    assert isinstance(sub, PartitionedSubscription)
    publisher = await make()

    # when it publishes events of two transactions, in two calls
    first = [keyed("T", "tx-a"), keyed("T", "tx-b")]
    later = [keyed("T", "tx-a"), keyed("T", "tx-b")]
    await publisher.publish(first)
    await publisher.publish(later)

    # then the member receives them all, each transaction's from one partition
    got = await receive(sub, 4)
    partition = {d.message.id: d.handle[0] for d in got}
    assert partition[first[0].id] == partition[later[0].id]
    assert partition[first[1].id] == partition[later[1].id]
    assert await publisher.lag(group) == 0
