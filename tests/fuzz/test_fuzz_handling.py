"""Property: whatever a foreign producer publishes, beside valid traffic, on every transport and
both kinds of store, nothing stalls or crashes, the valid traffic completes, and every bad
message is dead-lettered with a reason, deduplicated, or handled.

The services run once per test; Hypothesis sends one batch of generated messages per example
(see ``conftest.py`` for the profiles: a few examples in ``make test``, many with
``HYPOTHESIS_PROFILE=long``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from choreograph import (
    App,
    Context,
    Event,
    HandlerFailed,
    Middleware,
    Outcome,
    RetryPolicy,
    Runtime,
    Service,
    WorkerSettings,
)
from choreograph.envelope import decode, encode, new_envelope
from choreograph.errors import InvalidMessage
from choreograph.transport import DeadLetter, Message, Transport
from tests.conftest import transport_params
from tests.fuzz.strategies import poison
from tests.stores.conftest import PG_URL, drop_schemas
from tests.support.brokers import POSTGRES

#: Why a generated message may be dead-lettered. Not ``poison message``: that is the worker's
#: last resort for a message whose step escaped its savepoint, which the fuzz must never find.
EXPECTED_REASONS = {"malformed envelope", "unknown event type", "schema violation",
                    "payload too large", "attempts exhausted", "permanent failure",
                    "topic and type disagree"}  # fmt: skip
QUICK = RetryPolicy(max_attempts=2, immediate=1, base_delay=0.05, jitter=0)
#: Generous: only guards against a stall; each example normally ends in well under a second.
WAIT = 30.0
_PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
pytestmark = [pytest.mark.timeout(120 + 15 * _PROFILE.max_examples)]


class Order(Event):
    order_id: str
    amount: int


class Paid(Event):
    order_id: str
    amount: int


class Shipped(Event):
    order_id: str


def fuzz_app() -> App:
    """payment stores each order and emits Paid; shipping emits Shipped (terminal); audit stores
    every failure announcement. Each stores what it received, so hostile data reaches the
    stores."""
    payment = Service("payment", retry=QUICK)
    shipping = Service("shipping", retry=QUICK)
    audit = Service("audit", retry=QUICK)

    @payment.on(Order, emits=[Paid])
    async def charge(event: Order, ctx: Context) -> Paid:
        await ctx.state.put("order", event.order_id, event.to_data())
        return Paid(order_id=event.order_id, amount=event.amount)

    @shipping.on(Paid, emits=[Shipped])
    async def ship(event: Paid, ctx: Context) -> Shipped:
        await ctx.state.put("paid", event.order_id, event.to_data())
        return Shipped(order_id=event.order_id)

    @audit.on(HandlerFailed)
    async def note(event: HandlerFailed, ctx: Context) -> None:
        await ctx.state.put("failure", event.failed_event_id, event.to_data())

    return App("fuzz", [payment, shipping, audit], terminal=[Shipped])


@dataclass
class Watcher(Middleware):
    """What became of every handled event id, and which transactions shipped."""

    finished: set[str] = field(default_factory=set)
    shipped: set[str] = field(default_factory=set)

    def on_outcome(self, ctx: Context, outcome: Outcome) -> None:
        if outcome.kind in ("done", "duplicate", "ignored", "late"):
            self.finished.add(ctx.event_id)
        for envelope in outcome.emitted:
            if envelope.type == "Shipped":
                self.shipped.add(envelope.correlationid)


@dataclass
class System:
    runtime: Runtime
    transport: Transport
    watcher: Watcher
    sent_valid: list[Message] = field(default_factory=list)

    async def order(self) -> str:
        correlation = f"valid-{uuid.uuid4()}"
        envelope = new_envelope(
            "Order", {"order_id": correlation, "amount": 5}, source="fuzz",
            correlation_id=correlation,
        )  # fmt: skip
        message = Message(envelope.id, envelope.type, encode(envelope))
        await self.transport.publish([message])
        self.sent_valid.append(message)
        return correlation

    async def publish(self, topic: str, body: bytes | None) -> tuple[Message, str | None] | None:
        """Publish one generated message; None when the bus refuses it (it never entered)."""
        if body is None:  # a second delivery of a valid event
            original = self.sent_valid[-1]
            message = Message(str(uuid.uuid4()), original.topic, original.body)
        else:
            message = Message(str(uuid.uuid4()), topic, body)
        try:
            await self.transport.publish([message])
        except InvalidMessage:
            return None
        try:
            event_id: str | None = decode(message.body, limit=self.transport.max_message_bytes).id
        except InvalidMessage:
            event_id = None
        return message, event_id

    async def accounted(self, message: Message, event_id: str | None) -> DeadLetter | None:
        """Wait until the message is dead-lettered (returned) or handled (None)."""
        deadline = time.monotonic() + WAIT
        while True:
            for letter in await self.transport.dead_letters(None, 100_000):
                if letter.message.id == message.id:
                    return letter
            if event_id is not None and event_id in self.watcher.finished:
                return None
            assert time.monotonic() < deadline, (
                f"message {message.id} on {message.topic} was neither dead-lettered nor handled "
                f"within {WAIT}s: {message.body[:300]!r}"
            )
            await asyncio.sleep(0.05)

    async def shipped(self, correlations: list[str]) -> None:
        deadline = time.monotonic() + WAIT
        while not set(correlations) <= self.watcher.shipped:
            missing = set(correlations) - self.watcher.shipped
            assert time.monotonic() < deadline, f"valid orders stalled: {sorted(missing)}"
            await asyncio.sleep(0.05)


@asynccontextmanager
async def running(transport_url: str, store_url: str) -> AsyncIterator[System]:
    """The fuzzed app running on its own connection; at the end its services stop, then what the
    test left on the bus is deleted, then the connection closes."""
    watcher = Watcher()
    runtime = Runtime(
        fuzz_app(), transport=transport_url, store=store_url, middleware=[watcher],
        settings=WorkerSettings(poll_interval=0.05, lease=10.0),
    )  # fmt: skip
    await runtime.start()
    try:
        yield System(runtime, runtime.transport, watcher)
    finally:
        for name in list(runtime.workers):
            await runtime.remove_service(name)
        with contextlib.suppress(Exception):
            await runtime.transport.delete_namespace()
        await runtime.stop()


@pytest.fixture
async def on_sqlite_stores(transport_url: str, tmp_path: Path) -> AsyncIterator[System]:
    async with running(transport_url, f"sqlite:///{tmp_path}/{{service}}.db") as system:
        yield system


@pytest.fixture
async def on_postgres_stores(transport_url: str, namespace: str) -> AsyncIterator[System]:
    POSTGRES.require()
    try:
        async with running(transport_url, f"{PG_URL}?schema={namespace}_{{service}}") as system:
            yield system
    finally:
        await drop_schemas(namespace)


async def check(system: System, batch: list[tuple[str, bytes | None]]) -> None:
    # given valid orders before and after the generated messages
    valid = [await system.order()]
    sent = [await system.publish(topic, body) for topic, body in batch]
    valid += [await system.order(), await system.order()]
    # then the valid orders ship: nothing stalled, no lane died
    await system.shipped(valid)
    # and every generated message that entered the bus was dead-lettered with a reason, or
    # handled (a duplicate delivery dropped by the inbox, a valid event done)
    for entered in sent:
        if entered is None:
            continue
        letter = await system.accounted(*entered)
        if letter is not None:
            # handled in its own savepoint: the batch-wide fallback was never needed for it
            assert letter.failure.reason in EXPECTED_REASONS, letter
            assert letter.failure.error_type, letter
            await system.transport.discard(letter.id)  # keeps the next listings short


@given(batch=st.lists(poison(), min_size=1, max_size=4))
async def test_generated_messages_beside_valid_traffic_on_sqlite_stores(
    on_sqlite_stores: System, batch: list[tuple[str, bytes | None]]
) -> None:
    await check(on_sqlite_stores, batch)


@pytest.mark.postgres
@pytest.mark.parametrize("transport_name", transport_params(("memory", "nats")), indirect=True)
@given(batch=st.lists(poison(), min_size=1, max_size=4))
async def test_generated_messages_beside_valid_traffic_on_postgresql_stores(
    on_postgres_stores: System, batch: list[tuple[str, bytes | None]]
) -> None:
    await check(on_postgres_stores, batch)
