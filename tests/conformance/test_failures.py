"""Failures: a member process killed with SIGKILL, the transport reopened, the broker restarted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from choreograph.errors import TransportError
from choreograph.transport import Delivery
from tests.conformance._helpers import (
    ids,
    message,
    messages,
    receive_for,
    receive_n,
    skip_memory,
    unique,
)
from tests.conftest import SERVER_TRANSPORTS, TransportFactory
from tests.support.brokers import BROKERS, IN_CI

ROOT = Path(__file__).resolve().parents[2]


async def test_messages_held_by_a_killed_member_process_go_to_another_member(
    transport_name: str, transport_url: str, make_transport: TransportFactory
) -> None:
    skip_memory(transport_name)
    # given five messages held, unsettled, by a member running in another OS process (lease 2 s)
    bus = await make_transport()
    group, topic, lease = unique("g"), unique("topic"), 2.0
    await bus.declare_group(group, [topic])
    sent = messages(topic, 5)
    await bus.publish(sent)
    member = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.conformance._member",
        transport_url,
        group,
        topic,
        str(lease),
        str(len(sent)),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        held = await asyncio.wait_for(_read_until_holding(member), timeout=30)
        assert sorted(held) == sorted(ids(sent))

        # when that process is killed with SIGKILL
        member.send_signal(signal.SIGKILL)
        await member.wait()
    finally:
        if member.returncode is None:
            member.kill()
            await member.wait()

    # then another member of the group receives them all, as a later attempt
    other = await (await make_transport()).subscribe(group, [topic], lease=30)
    got = await receive_n(other, len(sent), within=lease + 20)
    assert sorted(ids(got)) == sorted(ids(sent))
    assert all(d.attempt >= 2 for d in got), [d.attempt for d in got]
    await other.ack(got)


async def _read_until_holding(process: asyncio.subprocess.Process) -> list[str]:
    assert process.stdout is not None
    held: list[str] = []
    while True:
        line = (await process.stdout.readline()).decode().strip()
        if not line:
            raise AssertionError(f"the member process exited early (code {process.returncode})")
        if line == "holding":
            return held
        if line != "subscribed":
            held.append(line)


@pytest.mark.broker_restart
async def test_messages_and_pending_retry_survive_reopening_the_transport(
    transport_name: str, make_transport: TransportFactory
) -> None:
    skip_memory(transport_name, "memory:// keeps nothing once closed, by design")
    group, topic, delay = unique("g"), unique("topic"), 2.0
    # given a retry scheduled 2 s later, and a message published but not yet received
    first = await make_transport()
    try:
        sub = await first.subscribe(group, [topic], lease=30)
        retried = message(topic)
        await first.publish([retried])
        [delivery] = await receive_n(sub, 1, within=5)
        await sub.retry(delivery, delay)
        retried_at = time.monotonic()
        waiting = message(topic)
        await first.publish([waiting])
    finally:
        # when every connection is closed and new ones are opened
        await first.close()
    second = await make_transport()
    try:
        sub = await second.subscribe(group, [topic], lease=30)

        # then the waiting message is there
        got = await receive_n(sub, 1, within=5)
        assert ids(got) == [waiting.id]
        assert got[0].attempt == 1
        await sub.ack(got)

        # and the retry still waits for its delay, then fires as attempt 2
        early = await receive_for(sub, delay - 0.3 - (time.monotonic() - retried_at))
        assert early == []
        late = await receive_n(sub, 1, within=delay + 8)
        assert ids(late) == [retried.id]
        assert time.monotonic() - retried_at >= delay - 0.05
        assert late[0].attempt == 2
        assert late[0].message.body == retried.body
        await sub.ack(late)
    finally:
        await second.close()


@pytest.mark.broker_restart
@pytest.mark.timeout(400)
async def test_every_confirmed_publish_survives_a_broker_server_restart(
    transport_name: str, make_transport: TransportFactory
) -> None:
    if transport_name not in SERVER_TRANSPORTS:
        pytest.skip(f"{transport_name} has no server process to restart")
    if not IN_CI and not os.environ.get("CHOREOGRAPH_BROKER_RESTART"):
        pytest.skip(
            "stops the shared broker server; runs under CI=true or CHOREOGRAPH_BROKER_RESTART=1"
        )
    if transport_name == "redis":
        # Redis is durable only with its append-only file; this machine starts it without.
        await _enable_redis_aof()
    broker = BROKERS[transport_name]
    # given a member subscribed, and a publisher publishing one message at a time in a loop
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    sub = await bus.subscribe(group, [topic], lease=30)
    confirmed: list[str] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def publish_forever() -> None:
        while not stop.is_set():
            sent = message(topic)
            try:
                await asyncio.wait_for(bus.publish([sent]), timeout=10)
            except Exception as exc:  # expected while the server is down
                failures.append(type(exc).__name__)
                await asyncio.sleep(0.2)
                continue
            confirmed.append(sent.id)
            await asyncio.sleep(0.005)

    publisher = asyncio.create_task(publish_forever())
    try:
        await _wait_for(lambda: len(confirmed) >= 20, 20, "20 publishes before the restart")

        # when the broker server is stopped and started again
        await asyncio.to_thread(broker.stop_server)
        await asyncio.to_thread(broker.start_server)
        restarted_at = len(confirmed)
        await _wait_for(
            lambda: len(confirmed) >= restarted_at + 20, 120, "the publisher to reconnect"
        )
    finally:
        stop.set()
        await publisher
        if not broker.is_up():
            await asyncio.to_thread(broker.start_server)

    # then every message whose publish returned reaches the member (which reconnected too)
    received: set[str] = set()
    deadline = time.monotonic() + 60
    while not set(confirmed) <= received and time.monotonic() < deadline:
        got: list[Delivery] = []
        with contextlib.suppress(TransportError):  # tolerated while the member reconnects
            got = await sub.receive(500, 1.0)
        received.update(ids(got))
        if got:
            await sub.ack(got)
    missing = set(confirmed) - received
    assert not missing, (
        f"{len(missing)} of {len(confirmed)} confirmed messages lost "
        f"(publish failures while down: {sorted(set(failures))})"
    )


async def _enable_redis_aof() -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis(host="127.0.0.1", port=6379)
    try:
        await client.config_set("appendonly", "yes")
        await client.config_set("appendfsync", "always")
        for _ in range(300):
            info = await client.info("persistence")
            if info["aof_enabled"] and not info["aof_rewrite_in_progress"]:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("Redis did not turn its append-only file on")
    finally:
        await client.aclose()


async def _wait_for(predicate: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)
