"""Kill a service with SIGKILL at each point of the handling path; after a restart every side
effect is applied exactly once and every emitted event is published. A handler writing rows of
its own table (through the driver connection or a SQLAlchemy session) leaves, at every point,
each row with its event (published or waiting in the outbox) or neither."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from choreograph.envelope import Envelope, decode, encode
from choreograph.store import store_from_url
from choreograph.transport import Message, Subscription, transport_from_url
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


POINTS = ["handled", "committed", "published"]
BACKENDS = ["sqlite", pytest.param("nats+postgres", marks=[pytest.mark.nats, pytest.mark.postgres])]


def start_ledger(
    transport: str, store: str, crash_at: str | None, writes: str = "state"
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CRASH_AT": crash_at or "", "CRASH_ON_BATCH": "3", "LEDGER_WRITES": writes}
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


@dataclass
class Ledger:
    """A bus and stores where ``sent`` (EVENTS additions) wait for the ledger service, and
    ``observer`` receives what the ledger publishes."""

    transport_url: str
    store_url: str
    observer: Subscription
    sent: list[Envelope]


@contextlib.asynccontextmanager
async def additions_waiting(backend: str, tmp_path: Path, namespace: str) -> AsyncIterator[Ledger]:
    if backend != "sqlite":
        NATS.require()
        POSTGRES.require()
    transport_url, store_url = backends(tmp_path, namespace)[backend]
    bus = transport_from_url(transport_url)
    await bus.connect()
    try:
        await bus.declare_group("ledger", ["Add"])
        observer = await bus.subscribe("observer", ["Added"])
        sent = [
            Envelope(id=str(uuid.uuid4()), type="Add", source="test", correlationid=f"tx-{n}",
                     data={"account": f"acc-{n % ACCOUNTS}", "amount": n})
            for n in range(EVENTS)
        ]  # fmt: skip
        await bus.publish([Message(e.id, e.type, encode(e)) for e in sent])
        yield Ledger(transport_url, store_url, observer, sent)
    finally:
        await bus.close()


async def crash(ledger: Ledger, point: str, writes: str) -> None:
    """Run the ledger until it kills itself (SIGKILL) at ``point`` of its third batch."""
    crashing = start_ledger(ledger.transport_url, ledger.store_url, point, writes)
    assert await asyncio.to_thread(crashing.wait, 60) == -9, crashing.stderr.read().decode()  # type: ignore[union-attr]


async def restart_until_done(
    ledger: Ledger, writes: str, published: dict[str, int], applied: Callable[[str], Awaitable[int]]
) -> None:
    """Run the ledger again, collecting what it publishes into ``published``, until every
    addition is ``applied`` (counted in its store) and published; then stop it."""
    survivor = start_ledger(ledger.transport_url, ledger.store_url, None, writes)
    try:
        for _ in range(300):  # a guard against hanging only: the checks after it say what is off
            await drain(ledger.observer, published, rounds=1)
            if await applied(ledger.store_url) >= EVENTS and len(published) >= EVENTS:
                break
    finally:
        survivor.terminate()
        await asyncio.to_thread(survivor.wait, 30)


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_crash_at_any_point_applies_every_effect_exactly_once(
    point: str, backend: str, tmp_path: Path, namespace: str
) -> None:
    async with additions_waiting(backend, tmp_path, namespace) as ledger:
        # given a ledger that dies at the chosen point of its third batch
        await crash(ledger, point, "state")
        # when it is started again and left to finish
        published: dict[str, int] = {}
        await restart_until_done(ledger, "state", published, applied_count)
        # then every Add was applied exactly once, and every Added was published
        applied, total = await ledger_state(ledger.store_url)
        assert sorted(applied) == sorted(e.id for e in ledger.sent)
        assert total == sum(range(EVENTS))
        assert len(published) == EVENTS


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


@pytest.mark.slow
@pytest.mark.parametrize("writes", ["connection", "session"])
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_crash_at_any_point_leaves_each_row_with_its_event_or_neither(
    point: str, backend: str, writes: str, tmp_path: Path, namespace: str
) -> None:
    async with additions_waiting(backend, tmp_path, namespace) as ledger:
        # given a ledger writing a row of its table per addition, killed at the chosen point
        await crash(ledger, point, writes)

        # then each row has its event, published or waiting in the outbox, and each event its row
        published: dict[str, int] = {}
        await drain(ledger.observer, published)
        rows = await entries(ledger.store_url)
        waiting = await outbox_amounts(ledger.store_url)
        amounts = [amount for _, amount in rows]
        assert len(set(amounts)) == len(amounts), "an addition applied twice"
        assert set(amounts) == set(published.values()) | waiting
        assert 0 < len(rows) < EVENTS  # (the kill came in the middle of the work)

        # and after a restart every addition has exactly one row and its event
        await restart_until_done(ledger, writes, published, entry_count)
        rows = await entries(ledger.store_url)
        assert sorted(event_id for event_id, _ in rows) == sorted(e.id for e in ledger.sent)
        assert sorted(published.values()) == list(range(EVENTS))


async def drain(observer: Subscription, published: dict[str, int], rounds: int = 3) -> None:
    """Receive what the observer has, until ``rounds`` receives in a row bring nothing."""
    empty = 0
    while empty < rounds:
        deliveries = await observer.receive(500, 0.2)
        empty = 0 if deliveries else empty + 1
        for delivery in deliveries:
            published[delivery.message.id] = decode(delivery.message.body).data["amount"]
        if deliveries:
            await observer.ack(deliveries)


async def query(store_url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` run on the ledger store's own connection."""
    store = store_from_url(store_url, "ledger")
    await store.open()
    try:
        async with store.transaction() as tx:
            if isinstance(tx.connection, sqlite3.Connection):
                return [tuple(row) for row in tx.connection.execute(sql).fetchall()]
            return [tuple(row) for row in await tx.connection.fetch(sql)]
    finally:
        await store.close()


async def entries(store_url: str) -> list[tuple[str, int]]:
    return [
        (row[0], row[1]) for row in await query(store_url, "SELECT event_id, amount FROM entries")
    ]


async def entry_count(store_url: str) -> int:
    return len(await entries(store_url))


async def outbox_amounts(store_url: str) -> set[int]:
    return {
        decode(bytes(row[0])).data["amount"]
        for row in await query(store_url, "SELECT body FROM outbox")
    }
