"""A participant written in Node.js (``tests/contracts/node/billing.mjs``, the ``nats`` client
alone) takes part in a choreography on NATS: it waits for the consumers the app declares for it,
turns orders into invoices the app's own service handles, retries a transient failure with a
delayed nak, and dead-letters a bad order the way choreograph does, so ``dlq`` lists it and a
corrected replay reaches it again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from choreograph import Context, Runtime
from choreograph.transport import Message, transport_from_url
from tests.contracts.shop import InvoiceIssued, OrderPlaced, build
from tests.support.brokers import NATS
from tests.support.node import NODE_PARTICIPANT, node_project

WAIT = 120.0  # hang guard: every wait polls for what it expects

pytestmark = [pytest.mark.slow, pytest.mark.nats]


@pytest.fixture
async def namespace() -> AsyncIterator[str]:
    NATS.require()
    name = f"node_{uuid.uuid4().hex[:10]}"
    yield name
    transport = transport_from_url(f"nats://127.0.0.1:4222?namespace={name}")
    await transport.connect()
    with contextlib.suppress(Exception):
        await transport.delete_namespace()
    await transport.close()


async def until(check: object, what: str, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + WAIT
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline or proc.returncode is not None:
            raise AssertionError(f"{what}: not seen (billing exited: {proc.returncode})")
        await asyncio.sleep(0.05)


async def test_a_node_participant_takes_part_on_nats(namespace: str, tmp_path: Path) -> None:
    node = node_project(NODE_PARTICIPANT, "nats")
    url = f"nats://127.0.0.1:4222?namespace={namespace}"
    shipped: dict[str, tuple[str, str | None, str | None]] = {}

    def ship(event: InvoiceIssued, ctx: Context) -> None:
        shipped[event.order_id] = (ctx.correlation_id, ctx.envelope.causationid, str(event.amount))

    app = build(shipped=ship)
    log = (tmp_path / "billing.log").open("w+")
    # given billing started before the app ever ran: it waits for its consumers
    proc = await asyncio.create_subprocess_exec(
        node, str(NODE_PARTICIPANT / "billing.mjs"),
        env={**os.environ, "NATS_URL": "nats://127.0.0.1:4222", "CHOREOGRAPH_NAMESPACE": namespace},
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    runtime = Runtime(app, transport=url, store=f"sqlite:///{tmp_path}/{{service}}.db",
                      services=["shipping"])  # fmt: skip
    try:
        await until(
            lambda: "waiting for" in (tmp_path / "billing.log").read_text(),
            "billing waiting for its consumers",
            proc,
        )
        await runtime.start()
        # when orders are placed, one failing once in billing, one missing its amount
        orders = {}
        for name in [*(f"o-{n}" for n in range(8)), "flaky-1"]:
            envelope = await runtime.publish(OrderPlaced(order_id=name, amount=10), source="shop")
            orders[name] = envelope
        bad = orjson.dumps(
            {"specversion": "1.0", "id": "bad-1", "source": "shop", "type": "OrderPlaced",
             "correlationid": "tx-bad", "data": {"order_id": "bad-1"}}
        )  # fmt: skip
        await runtime.transport.publish([Message("bad-1", "OrderPlaced", bad)])

        # then every good order is invoiced by billing and shipped by the app's own service
        await until(lambda: set(orders) <= set(shipped), "every good order shipped", proc)
        for name, envelope in orders.items():
            correlation, cause, amount = shipped[name]
            assert correlation == envelope.correlationid and cause == envelope.id
            assert amount == "12.0"
        # and the bad one is in billing's dead letters with billing's reason
        letters = await runtime.transport.dead_letters("billing")
        (dead,) = letters
        assert dead.group == "billing" and dead.failure.reason == "schema violation"
        assert "amount (number) are required" in dead.failure.error
        assert dead.message.id == "bad-1" and dead.message.body == bad

        # when it is replayed corrected, billing gets it again (as a message for it alone)
        fixed = orjson.loads(bad)
        fixed["data"]["amount"] = 5
        assert await runtime.transport.replay(dead.id, orjson.dumps(fixed))
        await until(lambda: "bad-1" in shipped, "the corrected order shipped", proc)
        assert shipped["bad-1"] == ("tx-bad", "bad-1", "6.0")
        assert await runtime.transport.dead_letters("billing") == []
        assert await runtime.transport.dead_letters("shipping") == []
    finally:
        if runtime.started:
            await runtime.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        log.seek(0)
        output = log.read()
        log.close()
    # and billing retried the transient failure once, by a delayed nak
    assert "retry flaky-1 after attempt 1" in output, output
    assert proc.returncode == 0, output
