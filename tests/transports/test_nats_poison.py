"""Poison on NATS, replayed beside valid traffic of the drone delivery: a foreign message near the
server's ``max_payload`` (it is dead-lettered by reference, and nothing the transport sends
makes the server close its connection), a connection the server closes anyway (it is opened
again by itself), and a message on a group's subject with a bad topic escape (dead-lettered with
its reason instead of failing every lease)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from choreograph import RetryPolicy, Runtime, WorkerSettings
from choreograph.demo import create_app
from choreograph.envelope import Envelope, encode
from choreograph.transport import DeadLetter, Message
from choreograph.transports.nats import NatsTransport
from tests.drone.conftest import calm_knobs, request_body
from tests.support.brokers import NATS

pytestmark = [pytest.mark.nats, pytest.mark.slow]

QUICK = RetryPolicy(max_attempts=3, immediate=1, base_delay=0.05, jitter=0)
REQUEST_GROUPS = ("package", "drone-scheduler", "delivery")  # every group of DeliveryRequested


class Drones:
    """The drone delivery in this process on the shared NATS server, in a namespace of its own."""

    def __init__(self, runtime: Runtime, namespace: str) -> None:
        self.runtime = runtime
        self.namespace = namespace

    @property
    def transport(self) -> NatsTransport:
        transport = self.runtime.transport
        assert isinstance(transport, NatsTransport)
        return transport

    async def request(self, number: int) -> str:
        body = request_body(number)
        envelope = Envelope(
            id=str(uuid.uuid4()),
            type="DeliveryRequested",
            source="test",
            correlationid=body["delivery_id"],
            data=body,
        )
        await self.transport.publish([Message(envelope.id, envelope.type, encode(envelope))])
        return str(body["delivery_id"])

    async def completed(self, delivery_ids: list[str], timeout: float = 30.0) -> None:
        """Wait until every delivery completed (fail after ``timeout``, a guard against hangs)."""
        deadline = time.monotonic() + timeout
        while True:
            async with self.runtime.unit_of_work("delivery") as uow:
                statuses = [
                    (await uow.state.get("delivery", did) or {}).get("status")
                    for did in delivery_ids
                ]
            if all(status == "completed" for status in statuses):
                return
            assert time.monotonic() < deadline, f"not all completed: {statuses}"
            await asyncio.sleep(0.05)

    async def dead_letters_of(
        self, event_id: str, count: int, timeout: float = 30.0
    ) -> list[DeadLetter]:
        deadline = time.monotonic() + timeout
        while True:
            found = [
                d
                for d in await self.transport.dead_letters(None, 10_000)
                if d.message.id == event_id
            ]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.05)

    async def foreign_publish(self, subject: str, body: bytes) -> int:
        """Store ``body`` on ``subject`` as another NATS client would (no header); its stream
        sequence."""
        nc = await nats.connect("nats://127.0.0.1:4222")
        try:
            answer = await nc.request(subject, body, timeout=10)
        finally:
            await nc.close()
        return int(orjson.loads(answer.data)["seq"])


@pytest.fixture
async def drones(tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[Drones]]]:
    NATS.require()
    runtimes: list[Drones] = []

    async def start() -> Drones:
        namespace = f"t{uuid.uuid4().hex[:12]}"
        app = create_app(calm_knobs(flight_seconds=0.05, join_timeout=30))
        for service in app.services.values():
            if service.name != "drone-scheduler":
                service.retry = QUICK
        runtime = Runtime(
            app,
            transport=f"nats://127.0.0.1:4222?namespace={namespace}",
            store=f"sqlite:///{tmp_path}/{{service}}.db",
            settings=WorkerSettings(poll_interval=0.1),
        )
        await runtime.start()
        runtimes.append(Drones(runtime, namespace))
        return runtimes[-1]

    yield start
    for one in runtimes:
        await one.transport.delete_namespace()
        await one.runtime.stop()


async def test_a_foreign_message_near_max_payload_is_dead_lettered_by_reference(
    drones: Callable[[], Awaitable[Drones]],
) -> None:
    # given the drone delivery on NATS, and a foreign producer's message on a topic it consumes,
    # 100 bytes under the server's max_payload (over what the transport itself would send)
    system = await drones()
    limit = system.transport._client.max_payload
    body = b"{" + os.urandom((limit - 100) // 2).hex().encode()[: limit - 101] + b"}"
    assert system.transport.max_message_bytes < len(body) < limit
    good = [await system.request(n) for n in range(5)]
    seq = await system.foreign_publish(f"{system.namespace}.ev.DeliveryRequested", body)
    good += [await system.request(n) for n in range(5, 10)]

    # then valid traffic completes
    await system.completed(good)
    # and every group of its topic holds it as a dead letter by reference: its size and digest
    dead = await system.dead_letters_of(f"nats:{seq}", len(REQUEST_GROUPS))
    assert sorted(d.group for d in dead) == sorted(REQUEST_GROUPS)
    for letter in dead:
        assert letter.failure.reason == "payload too large", letter.failure
        reference: dict[str, Any] = orjson.loads(letter.message.body)
        assert reference["oversized"] is True
        assert reference["bytes"] == len(body)
        assert reference["sha256"] == hashlib.sha256(body).hexdigest()
    # and no dead letter made the server close the connection: it was never opened again
    assert system.transport._client.reopened == 0
    await system.completed([await system.request(11)])


async def test_a_connection_the_server_closed_is_opened_again_by_itself(
    drones: Callable[[], Awaitable[Drones]],
) -> None:
    # given the drone delivery running on NATS
    system = await drones()
    await system.completed([await system.request(1)])
    client = system.transport._client
    first = client.nc

    # when the server closes the connection for a protocol violation (a payload over its
    # max_payload, written past every check, as a buggy client would)
    size = client.max_payload + 1
    await client.nc._send_command(b"PUB %s.junk %d\r\n" % (system.namespace.encode(), size))  # type: ignore[attr-defined]
    await client.nc._send_command(b"x" * size + b"\r\n")  # type: ignore[attr-defined]
    await client.nc._flush_pending()  # type: ignore[attr-defined]

    # then it is connected again by itself, and deliveries flow again through every group:
    # usually nats-py reads the server's -ERR and closes for good, and the transport opens a new
    # connection; when the server's reset overtakes the -ERR (a busy machine), nats-py sees a
    # lost connection and reconnects by itself
    deadline = time.monotonic() + 30
    while client.reopened < 1 and first.stats["reconnects"] < 1:
        assert time.monotonic() < deadline, "the connection was not opened again"
        await asyncio.sleep(0.05)
    await system.completed([await system.request(n) for n in range(2, 12)])


async def test_a_connection_closed_without_telling_is_opened_again_on_its_next_use(
    drones: Callable[[], Awaitable[Drones]],
) -> None:
    # given the drone delivery running on NATS
    system = await drones()
    await system.completed([await system.request(1)])
    client = system.transport._client
    first = client.nc

    # when nats-py closes the connection for good without calling its closed callback (its close
    # raises when it flushes leftovers onto a socket the server reset: seen under load after a
    # protocol violation)
    await first._close(first.CLOSED, do_cbs=False)  # type: ignore[attr-defined]
    assert first.is_closed and client.reopened == 0

    # then the next use of the connection (a pull request, an ack) opens a new one, and
    # deliveries flow again through every group
    deadline = time.monotonic() + 30
    while client.reopened < 1:
        assert time.monotonic() < deadline, "the connection was not opened again"
        await asyncio.sleep(0.05)
    assert client.nc is not first
    await system.completed([await system.request(n) for n in range(2, 12)])


async def test_a_message_on_a_bad_topic_escape_is_dead_lettered_with_its_reason(
    drones: Callable[[], Awaitable[Drones]],
) -> None:
    # given the drone delivery on NATS, and a foreign message sent to package alone on a
    # subject whose topic token has a bad escape
    system = await drones()
    good = [await system.request(n) for n in range(5)]
    body = encode(
        Envelope(id=str(uuid.uuid4()), type="DeliveryRequested", source="test",
                 correlationid="c-1", data=request_body(99))
    )  # fmt: skip
    seq = await system.foreign_publish(f"{system.namespace}.grp.package.=ZZ", body)
    good += [await system.request(n) for n in range(5, 10)]

    # then valid traffic completes, and package dead-letters it once, saying why
    await system.completed(good)
    [dead] = await system.dead_letters_of(f"nats:{seq}", 1)
    assert dead.group == "package"
    assert dead.failure.reason == "invalid message"
    assert "=ZZ" in dead.failure.error and "not a topic token" in dead.failure.error
    assert dead.message.topic == "=ZZ"
    assert dead.message.body == body
    # and package keeps working
    await system.completed([await system.request(11)])
