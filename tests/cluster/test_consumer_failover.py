"""A member waiting in a long ``receive`` when its consumer's leader dies: its pull request died
with that leader, the idle heartbeats stop, and the member asks the new leader."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from choreograph.transport import Message, transport_from_url
from tests.support.nats_cluster import NatsCluster

pytestmark = [pytest.mark.nats, pytest.mark.slow]


def waiting_pulls(cluster: NatsCluster, node: str, stream: str, consumer: str) -> int:
    """Pull requests waiting on ``consumer``, as its leader ``node`` reports them."""
    jsz = cluster.nodes[node].monitor("jsz?accounts=true&streams=true&consumers=true") or {}
    for account in jsz.get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            for state in detail.get("consumer_detail") or []:
                if detail.get("name") == stream and state.get("name") == consumer:
                    return int(state.get("num_waiting", 0))
    return 0


async def test_a_long_receive_gets_what_is_published_after_its_consumers_leader_died(
    nats_cluster: NatsCluster,
) -> None:
    # given a member of a group connected to a node that does not lead the group's consumer
    namespace = f"t{uuid.uuid4().hex[:12]}"
    stream, consumer = f"{namespace}_events", "g~a"
    publisher = transport_from_url(nats_cluster.transport_url(namespace))
    await publisher.connect()
    await publisher.declare_group("g", ["a"])
    leader = nats_cluster.consumer_leader(stream, consumer)
    assert leader is not None
    other = next(name for name in nats_cluster.nodes if name != leader)
    only_other = nats_cluster.transport_url(namespace, first=other).split("&servers=")[0]
    member = transport_from_url(only_other)
    await member.connect()
    sub = await member.subscribe("g", ["a"], lease=10)
    try:
        # when it waits in a receive of 60 s, its consumer's leader is SIGKILLed and a message
        # is published once another node leads the consumer
        async def kill_then_publish() -> None:
            deadline = time.monotonic() + 60
            while not waiting_pulls(nats_cluster, leader, stream, consumer):
                assert time.monotonic() < deadline, "the receive sent no pull request"
                await asyncio.sleep(0.05)
            nats_cluster.kill(leader)
            while nats_cluster.consumer_leader(stream, consumer) in (None, leader):
                assert time.monotonic() < deadline, "no new leader"
                await asyncio.sleep(0.1)
            await publisher.publish([Message(uuid.uuid4().hex, "a", b"after the failover")])

        fault = asyncio.create_task(kill_then_publish())
        got = await sub.receive(1, 60)
        await fault

        # then that receive returns the message (not an empty batch when its 60 s are up)
        assert [d.message.body for d in got] == [b"after the failover"]
        await sub.ack(got)
    finally:
        await sub.close()
        await member.close()
        await publisher.delete_namespace()
        await publisher.close()
