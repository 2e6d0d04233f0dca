"""Redis primary and replica of the test's own: with ``wait_replicas=1``, what a publish confirmed
survives the loss of the primary and a failover by hand to the replica (messages and consumer
groups are on the replica). On loopback the replica is rarely behind, so this shows the failover
path, not that ``WAIT`` is needed: that follows from Redis' asynchronous replication."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from choreograph.transport import Message, transport_from_url
from tests.support.brokers import IN_CI
from tests.support.procs import free_port, port_open, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisNode:
    """One redis-server process on a free loopback port, stopped by its pid."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", str(root), *extra]  # fmt: skip
        with (root / "redis.log").open("ab") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        wait_until(lambda: port_open(self.port), 30, f"redis-server on {self.port}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def primary_and_replica(tmp_path: Path) -> Iterator[tuple[RedisNode, RedisNode]]:
    if not Path(REDIS_SERVER).exists():
        message = f"{REDIS_SERVER} not found"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    primary = RedisNode(tmp_path / "primary")
    replica = RedisNode(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    try:
        yield primary, replica
    finally:
        replica.kill()
        primary.kill()


async def test_what_a_publish_confirmed_with_wait_replicas_survives_a_failover(
    primary_and_replica: tuple[RedisNode, RedisNode],
) -> None:
    # given a primary with its replica in sync, and a transport waiting for one replica
    primary, replica = primary_and_replica
    client = aioredis.Redis(port=replica.port)
    deadline = time.monotonic() + 30
    while (await client.info("replication")).get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica never synced"
        await asyncio.sleep(0.1)
    namespace = f"t{uuid.uuid4().hex[:12]}"
    options = f"namespace={namespace}&wait_replicas=1&wait_timeout=5"
    bus = transport_from_url(f"redis://127.0.0.1:{primary.port}/0?{options}")
    await bus.connect()
    await bus.declare_group("g", ["a"])
    sent = [Message(uuid.uuid4().hex, "a", b"%d" % n) for n in range(300)]
    for start in range(0, len(sent), 50):
        await bus.publish(sent[start : start + 50])

    # when the primary is SIGKILLed right after, and the replica is made the primary by hand
    primary.kill()
    with_bus_closed = asyncio.wait_for(bus.close(), 10)
    await asyncio.gather(with_bus_closed, return_exceptions=True)
    await client.execute_command("REPLICAOF", "NO", "ONE")
    await client.aclose()

    # then a member on the new primary receives every confirmed message
    survivor = transport_from_url(f"redis://127.0.0.1:{replica.port}/0?namespace={namespace}")
    await survivor.connect()
    try:
        sub = await survivor.subscribe("g", ["a"], lease=30)
        got: dict[str, bytes] = {}
        deadline = time.monotonic() + 30
        while len(got) < len(sent) and time.monotonic() < deadline:
            batch = await sub.receive(100, 0.5)
            got.update((d.message.id, d.message.body) for d in batch)
            await sub.ack(batch)
        assert got == {m.id: m.body for m in sent}
        await sub.close()
    finally:
        await survivor.close()
