"""Shared fixtures: every transport by URL, with unique names per test; a fresh flow recorder
database on each backend."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from choreograph.transport import Transport, transport_from_url
from tests.stores.conftest import PG_URL
from tests.support.brokers import BROKERS, POSTGRES

# name -> (pytest mark or None, URL template); {ns} is a namespace unique to the test, {tmp} its dir
TRANSPORT_URLS: dict[str, str] = {
    "memory": "memory://",
    "sqlite": "sqlite:///{tmp}/bus.db",
    "nats": "nats://127.0.0.1:4222?namespace={ns}",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/?namespace={ns}",
    "redis": "redis://127.0.0.1:6379/0?namespace={ns}",
}
SERVER_TRANSPORTS = ("nats", "amqp", "redis")
_MARKS = {"nats": pytest.mark.nats, "amqp": pytest.mark.rabbitmq, "redis": pytest.mark.redis}


def transport_params(names: tuple[str, ...] = tuple(TRANSPORT_URLS)) -> list[object]:
    return [
        pytest.param(name, marks=[_MARKS[name]] if name in _MARKS else [], id=name)
        for name in names
    ]


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture(params=transport_params())
def transport_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name in BROKERS:
        BROKERS[name].require()
    return name


@pytest.fixture
def transport_url(transport_name: str, namespace: str, tmp_path: Path) -> str:
    return TRANSPORT_URLS[transport_name].format(ns=namespace, tmp=tmp_path)


TransportFactory = Callable[[], Awaitable[Transport]]


@pytest.fixture
async def make_transport(transport_url: str) -> AsyncIterator[TransportFactory]:
    """Connected transports on the test's bus; each call is a new connection (a new process'
    view for server and sqlite transports; the same bus object for memory://)."""
    opened: list[Transport] = []
    groups: set[str] = set()  # declared through any of them (AMQP cannot list queues)
    shared: Transport | None = None

    def recording(transport: Transport) -> Transport:
        declare = transport.declare_group

        async def declare_group(group: str, topics: Collection[str]) -> None:
            groups.add(group)
            await declare(group, topics)

        transport.declare_group = declare_group  # type: ignore[method-assign]
        return transport

    async def make() -> Transport:
        nonlocal shared
        if transport_url.startswith("memory://"):
            if shared is None:
                shared = transport_from_url(transport_url)
                await shared.connect()
                opened.append(shared)
            return shared
        transport = recording(transport_from_url(transport_url))
        await transport.connect()
        opened.append(transport)
        return transport

    yield make
    # Leave nothing on the shared brokers: RabbitMQ's quorum queues hold file handles, and a
    # long run that leaves them behind runs it out of handles (new connections then hang).
    # Delete once every connection is closed, from a fresh one: a member still reconnecting
    # (after a broker restart) would declare its queues again behind an earlier delete.
    for transport in reversed(opened):
        await transport.close()
    if opened and not transport_url.startswith("memory://"):
        try:
            async with transport_from_url(transport_url) as fresh:
                for group in groups:
                    await fresh.declare_group(group, ())
                await fresh.delete_namespace()
        except Exception as exc:  # the test's own outcome stands; the leftover is reported
            warnings.warn(f"the test's namespace was not deleted: {exc!r}", stacklevel=1)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def recorder_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh flow recorder database URL: its own SQLite file, or its own PostgreSQL schema
    (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/flows.db"
        return
    POSTGRES.require()
    schema = "flows_" + uuid.uuid4().hex[:10]
    yield f"{PG_URL}?schema={schema}"
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
