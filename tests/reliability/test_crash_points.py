"""Kill a service with SIGKILL at each point of the handling path; after a restart every side
effect is applied exactly once and every emitted event is published."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from choreograph.envelope import Envelope, encode
from choreograph.store import store_from_url
from choreograph.transport import Message, transport_from_url
from tests.support.brokers import NATS, POSTGRES

EVENTS = 120
ACCOUNTS = 7


def backends(tmp: Path, namespace: str) -> dict[str, tuple[str, str]]:
    return {
        "sqlite": (f"sqlite:///{tmp}/bus.db", f"sqlite:///{tmp}/{{service}}.db"),
        "nats+postgres": (
            f"nats://127.0.0.1:4222?namespace={namespace}",
            f"postgresql://postgres@127.0.0.1:5432/test?schema={namespace}_{{service}}",
        ),
    }


def start_ledger(transport: str, store: str, crash_at: str | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CRASH_AT": crash_at or "", "CRASH_ON_BATCH": "3"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "choreograph",
            "run",
            "--app",
            "tests.reliability.crash_app:app",
            "--transport",
            transport,
            "--store",
            store,
            "--batch-size",
            "10",
            "--lease",
            "1",
            "--middleware",
            "tests.reliability.crash_app:crash_middleware",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
@pytest.mark.parametrize("point", ["handled", "committed", "published"])
@pytest.mark.parametrize(
    "backend",
    ["sqlite", pytest.param("nats+postgres", marks=[pytest.mark.nats, pytest.mark.postgres])],
)
async def test_a_crash_at_any_point_applies_every_effect_exactly_once(
    point: str, backend: str, tmp_path: Path, namespace: str
) -> None:
    if backend != "sqlite":
        NATS.require()
        POSTGRES.require()
    transport_url, store_url = backends(tmp_path, namespace)[backend]
    bus = transport_from_url(transport_url)
    await bus.connect()
    try:
        await bus.declare_group("ledger", ["Add"])
        observer = await bus.subscribe("observer", ["Added"])
        sent = []
        for n in range(EVENTS):
            envelope = Envelope(
                id=str(uuid.uuid4()), type="Add", source="test", correlationid=f"tx-{n}",
                data={"account": f"acc-{n % ACCOUNTS}", "amount": n},
            )  # fmt: skip
            sent.append(envelope)
        await bus.publish([Message(e.id, e.type, encode(e)) for e in sent])

        # given a ledger that dies at the chosen point of its third batch
        crashing = start_ledger(transport_url, store_url, point)
        assert await asyncio.to_thread(crashing.wait, 60) == -9, crashing.stderr.read().decode()  # type: ignore[union-attr]

        # when it is started again and left to finish
        survivor = start_ledger(transport_url, store_url, None)
        published: set[str] = set()
        try:
            for _ in range(300):
                for delivery in await observer.receive(500, 0.2):
                    published.add(delivery.message.id)
                    await observer.ack([delivery])
                if await applied_count(store_url) >= EVENTS and len(published) >= EVENTS:
                    break
        finally:
            survivor.terminate()
            await asyncio.to_thread(survivor.wait, 30)

        # then every Add was applied exactly once, and every Added was published
        applied, total = await ledger_state(store_url)
        assert sorted(applied) == sorted(e.id for e in sent)
        assert total == sum(range(EVENTS))
        assert len(published) == EVENTS
    finally:
        await bus.close()


async def ledger_state(store_url: str) -> tuple[list[str], int]:
    store = store_from_url(store_url, "ledger")
    await store.open()
    try:
        async with store.transaction() as tx:
            accounts = await tx.find("account", limit=1000)
    finally:
        await store.close()
    applied = [event_id for _, doc in accounts for event_id in doc["applied"]]
    return applied, sum(doc["total"] for _, doc in accounts)


async def applied_count(store_url: str) -> int:
    return len((await ledger_state(store_url))[0])
