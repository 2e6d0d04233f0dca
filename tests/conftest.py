"""Shared fixtures: every transport by URL, with unique names per test."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from choreograph.transport import Transport, transport_from_url
from tests.support.brokers import BROKERS

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
    shared: Transport | None = None

    async def make() -> Transport:
        nonlocal shared
        if transport_url.startswith("memory://"):
            if shared is None:
                shared = transport_from_url(transport_url)
                await shared.connect()
                opened.append(shared)
            return shared
        transport = transport_from_url(transport_url)
        await transport.connect()
        opened.append(transport)
        return transport

    yield make
    for transport in reversed(opened):
        # leave nothing on the shared brokers (RabbitMQ runs out of file handles otherwise)
        with contextlib.suppress(Exception):
            await transport.delete_namespace()
        await transport.close()
