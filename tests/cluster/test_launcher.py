"""The cluster launcher itself: leaders are found, a killed leader is replaced, a restarted node
rejoins with its store."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from choreograph.errors import ConfigurationError
from choreograph.transport import Message, transport_from_url
from tests.support.nats_cluster import NatsCluster

pytestmark = [pytest.mark.nats, pytest.mark.slow]


async def _until(predicate: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.1)


async def test_a_killed_stream_leader_is_replaced_and_rejoins_when_restarted(
    nats_cluster: NatsCluster,
) -> None:
    # given a transport on the whole cluster, streams and a group with 3 replicas
    namespace = f"t{uuid.uuid4().hex[:12]}"
    stream = f"{namespace}_events"
    bus = transport_from_url(nats_cluster.transport_url(namespace, publish_timeout=60))
    await bus.connect()
    try:
        await bus.declare_group("g", ["a"])
        sub = await bus.subscribe("g", ["a"], lease=5)
        await bus.publish([Message(uuid.uuid4().hex, "a", b"before")])
        leader = nats_cluster.wait_stream_leader(stream)
        assert set(nats_cluster.consumer_leaders(stream)) == {"g", "g~a"}
        assert sum(nats_cluster.connections(namespace).values()) == 1

        # when the stream's leader is SIGKILLed
        nats_cluster.kill(leader)

        # then another node leads it, and publishing and receiving go on
        successor = await asyncio.to_thread(nats_cluster.wait_stream_leader, stream)
        assert successor != leader
        await bus.publish([Message(uuid.uuid4().hex, "a", b"after")])
        got: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(got) < 2 and time.monotonic() < deadline:
            batch = await sub.receive(10, 1.0)
            got += [d.message.body for d in batch]
            await sub.ack(batch)
        assert sorted(got) == [b"after", b"before"]

        # and the killed node, restarted on its store, is a current replica again
        nats_cluster.start_node(leader)
        await asyncio.to_thread(nats_cluster.wait_ready)

        def caught_up() -> bool:
            jsz = nats_cluster.nodes[leader].monitor("jsz?accounts=true&streams=true") or {}
            for account in jsz.get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") == stream:
                        return int((detail.get("state") or {}).get("last_seq", 0)) >= 2
            return False

        await _until(caught_up, 60, f"{leader} to hold the stream again")
        await sub.close()
    finally:
        await bus.delete_namespace()
        await bus.close()


async def test_interest_retention_with_replicas_is_refused_on_nats_server_2_9(
    nats_cluster: NatsCluster,
) -> None:
    # given a URL asking for replicated streams with interest retention (what loses messages on
    # nats-server 2.9: a message one group acked is removed before the other groups got it)
    namespace = f"t{uuid.uuid4().hex[:12]}"
    url = nats_cluster.transport_url(namespace, retention="interest")
    bus = transport_from_url(url)
    # when the transport connects, then it refuses, saying what to use instead
    with pytest.raises(ConfigurationError, match="retention=limits with max_age"):
        await bus.connect()
    # and it created nothing, and closed its connection
    assert nats_cluster.stream_leader(f"{namespace}_events") is None
    await _until(
        lambda: not sum(nats_cluster.connections(namespace).values()), 30, "the connection closed"
    )
