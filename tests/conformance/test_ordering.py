"""Ordering per key in one process, on every transport: a service whose handlers declare
``ordered_by`` handles the events of one key in the order they were published, also when one of
them is retried or redelivered after its lease, while other keys go on in parallel."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from choreograph import (
    App,
    Context,
    Event,
    RetryLater,
    RetryPolicy,
    Runtime,
    Service,
    WorkerSettings,
)
from choreograph.envelope import Envelope, encode
from choreograph.transport import Message, Transport
from tests.conftest import TransportFactory
from tests.stores.conftest import PG_URL, drop_schemas
from tests.support.brokers import POSTGRES

HANG_GUARD = 90.0


class Step(Event):
    order_id: str
    n: int


class Undo(Event):
    order_id: str
    n: int


def step(order_id: str, n: int, type_: str = "Step") -> Message:
    envelope = Envelope(
        id=str(uuid.uuid4()), type=type_, source="test", correlationid=f"c-{order_id}",
        data={"order_id": order_id, "n": n},
    )  # fmt: skip
    return Message(envelope.id, envelope.type, encode(envelope))


def interleaved(keys: list[str], per_key: int) -> list[Message]:
    """``per_key`` steps of every key, numbered from 0, the keys interleaved."""
    return [step(key, n) for n in range(per_key) for key in keys]


def by_key(handled: list[tuple[str, int]]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for key, n in handled:
        found.setdefault(key, []).append(n)
    return found


async def wait_for(check: Callable[[], object], timeout: float = HANG_GUARD) -> None:
    """Poll ``check`` until it is truthy (the timeout only guards against a hang)."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - polls the handlers' records
            await asyncio.sleep(0.01)


def runtime_for(
    service: Service,
    connection: Transport,
    tmp_path: Path,
    lease: float = 30.0,
    store: str | None = None,
) -> Runtime:
    """A runtime of ``service`` in four lanes of small batches on ``connection``, a connection of
    its own from ``make_transport`` (the one in-process bus for ``memory://``), which it closes
    when it stops; the fixture deletes the groups declared through it when the test ends."""
    return Runtime(
        App("ordering", [service]),
        transport=connection,
        store=store or f"sqlite:///{tmp_path}/{{service}}.db",
        settings=WorkerSettings(concurrency=4, batch_size=5, poll_interval=0.2, lease=lease),
    )


async def test_events_of_one_key_are_handled_in_publish_order(
    make_transport: TransportFactory, tmp_path: Path
) -> None:
    # given a service ordered by order_id, handling in four lanes of small batches, whose
    # handler fails one event in four on its first attempt (retried at once or after a short
    # delay) and takes a random short while (so lanes finish out of order)
    handled: list[tuple[str, int]] = []
    service = Service("orders", retry=RetryPolicy(max_attempts=3, base_delay=0.05, jitter=0))
    rng = random.Random(7)
    failing = {(f"k{i}", n) for i in range(8) for n in range(12) if rng.random() < 0.25}

    @service.on(Step, ordered_by="order_id")
    async def record(event: Step, ctx: Context) -> None:
        await asyncio.sleep(rng.uniform(0, 0.005))
        if ctx.attempt == 1 and (event.order_id, event.n) in failing:
            raise RetryLater("transient", delay=rng.choice([0.0, 0.05]))
        handled.append((event.order_id, event.n))

    bus = await make_transport()
    keys = [f"k{i}" for i in range(8)]
    async with runtime_for(service, await make_transport(), tmp_path):
        # when 8 keys x 12 steps are published, interleaved, in several publishes
        sent = interleaved(keys, 12)
        for start in range(0, len(sent), 16):
            await bus.publish(sent[start : start + 16])
        await wait_for(lambda: len(handled) >= len(sent))

    # then each key's steps were handled once each, in the order they were published, the
    # failed ones before the later steps of their key
    assert by_key(handled) == {key: list(range(12)) for key in keys}


async def test_a_key_waiting_for_a_retry_holds_back_only_its_own_events(
    make_transport: TransportFactory, tmp_path: Path
) -> None:
    # given an ordered service whose first step of key "stuck" asks to be retried after 0.2 s
    # until the test lets it through
    handled: list[tuple[str, int]] = []
    attempts: list[int] = []
    let_through = asyncio.Event()
    service = Service("orders", retry=RetryPolicy(max_attempts=10_000, jitter=0))

    @service.on(Step, ordered_by="order_id")
    async def record(event: Step, ctx: Context) -> None:
        if (event.order_id, event.n) == ("stuck", 0):
            attempts.append(ctx.attempt)
            if not let_through.is_set():
                raise RetryLater("not yet", delay=0.2)
        handled.append((event.order_id, event.n))

    bus = await make_transport()
    others = [f"k{i}" for i in range(5)]
    async with runtime_for(service, await make_transport(), tmp_path):
        # when "stuck" 0 has been retried, and steps of "stuck" and five other keys arrive
        await bus.publish([step("stuck", 0)])
        await wait_for(lambda: len(attempts) >= 2)
        await bus.publish(interleaved(["stuck", *others], 4)[1:])

        # then every other key is handled, in order, while "stuck" is still being retried
        await wait_for(lambda: len(handled) == 5 * 4)
        assert by_key(handled) == {key: [0, 1, 2, 3] for key in others}

        # and once "stuck" 0 goes through, its later steps follow it, in order
        let_through.set()
        await wait_for(lambda: len(handled) == 6 * 4)
    assert by_key(handled)["stuck"] == [0, 1, 2, 3]
    assert attempts == list(range(1, len(attempts) + 1))


@pytest.fixture
async def postgres_store(namespace: str) -> AsyncIterator[str]:
    """A PostgreSQL store URL in schemas of the test's own (dropped afterwards)."""
    POSTGRES.require()
    yield f"{PG_URL}?schema={namespace}_{{service}}"
    await drop_schemas(namespace)


async def test_a_slow_handler_holds_back_only_its_own_key(
    make_transport: TransportFactory, tmp_path: Path, postgres_store: str
) -> None:
    # given an ordered service on the PostgreSQL store (its lanes' transactions run side by
    # side), whose first step of key "slow" stays in its handler until the test lets it go
    handled: list[tuple[str, int]] = []
    started, release = asyncio.Event(), asyncio.Event()
    service = Service("orders")

    @service.on(Step, ordered_by="order_id")
    async def record(event: Step, ctx: Context) -> None:
        if (event.order_id, event.n) == ("slow", 0):
            started.set()
            await release.wait()
        handled.append((event.order_id, event.n))

    bus = await make_transport()
    others = [f"k{i}" for i in range(5)]
    async with runtime_for(service, await make_transport(), tmp_path, store=postgres_store):
        try:
            await bus.publish([step("slow", 0)])
            async with asyncio.timeout(HANG_GUARD):
                await started.wait()

            # when more steps of "slow" and of five other keys arrive while it is in its handler
            await bus.publish(interleaved(["slow", *others], 4)[1:])

            # then every other key is handled, in order, while "slow" is in its handler and its
            # later steps wait for it
            await wait_for(lambda: len(handled) == 5 * 4)
            assert by_key(handled) == {key: [0, 1, 2, 3] for key in others}
        finally:
            release.set()  # and once it is let go, its steps follow in order
        await wait_for(lambda: len(handled) == 6 * 4)
    assert by_key(handled)["slow"] == [0, 1, 2, 3]


async def test_a_retried_event_is_handled_before_the_later_ones_of_its_key(
    make_transport: TransportFactory, tmp_path: Path
) -> None:
    # given an ordered service whose handler asks for step 0 of key "a" again after 1 s, once
    handled: list[tuple[str, int]] = []
    attempts: list[int] = []
    service = Service("orders", retry=RetryPolicy(max_attempts=3, jitter=0))

    @service.on(Step, ordered_by="order_id")
    async def record(event: Step, ctx: Context) -> None:
        if (event.order_id, event.n) == ("a", 0):
            attempts.append(ctx.attempt)
            if ctx.attempt == 1:
                raise RetryLater("not yet", delay=1.0)
        handled.append((event.order_id, event.n))

    bus = await make_transport()
    async with runtime_for(service, await make_transport(), tmp_path):
        # when steps of "a" and "b" are published together, "a" 0 first
        await bus.publish(interleaved(["a", "b"], 6))
        await wait_for(lambda: len(handled) == 12)

    # then "a" 0 came back once, and every later step of "a" waited for it
    assert attempts == [1, 2]
    assert by_key(handled) == {"a": list(range(6)), "b": list(range(6))}


async def test_an_event_redelivered_after_its_lease_keeps_its_place(
    make_transport: TransportFactory, tmp_path: Path
) -> None:
    # given an ordered service with a 1.5 s lease whose first step of "a" is still in its
    # handler when the lease runs out and the transport delivers it again
    handled: list[tuple[str, int]] = []
    runs: list[int] = []
    service = Service("orders")
    redelivered = asyncio.Event()

    @service.on(Step, ordered_by="order_id")
    async def record(event: Step, ctx: Context) -> None:
        runs.append(event.n)
        if event.n == 0:
            await redelivered.wait()
        handled.append((event.order_id, event.n))

    bus = await make_transport()
    runtime = runtime_for(service, await make_transport(), tmp_path, lease=1.5)
    async with runtime:
        await bus.publish([step("a", 0), step("a", 1)])
        worker = runtime.worker("orders")

        # when the copy of step 0 arrives (step 0 in its handler, step 1 and the copy waiting)
        await wait_for(lambda: worker.inflight >= 3)
        redelivered.set()
        await wait_for(lambda: len(handled) == 2 and worker.inflight == 0)

    # then step 0 ran once (the copy was a duplicate) and before step 1
    assert handled == [("a", 0), ("a", 1)]
    assert runs == [0, 1]


async def test_events_of_two_types_with_one_key_keep_their_order_where_the_transport_does(
    make_transport: TransportFactory, tmp_path: Path
) -> None:
    # given a service with two handlers ordered by the same field, in one key space
    handled: list[tuple[str, int]] = []
    service = Service("orders")

    @service.on(Step, ordered_by="order_id")
    async def forward(event: Step, ctx: Context) -> None:
        handled.append((event.order_id, event.n))

    @service.on(Undo, ordered_by="order_id")
    async def back(event: Undo, ctx: Context) -> None:
        handled.append((event.order_id, event.n))

    bus = await make_transport()
    keys = [f"k{i}" for i in range(6)]
    async with runtime_for(service, await make_transport(), tmp_path):
        # when each key's events are published taking turns between the two types
        sent = [step(key, n, "Step" if n % 2 == 0 else "Undo") for n in range(10) for key in keys]
        for start in range(0, len(sent), 9):
            await bus.publish(sent[start : start + 9])
        await wait_for(lambda: len(handled) >= len(sent))

    # then each key's events were handled in publish order where one member receives in publish
    # order across topics, and in each type's publish order always
    order = by_key(handled)
    assert bus.member_order in ("group", "topic")
    for key in keys:
        if bus.member_order == "group":
            assert order[key] == list(range(10))
        assert [n for n in order[key] if n % 2 == 0] == list(range(0, 10, 2))
        assert [n for n in order[key] if n % 2 == 1] == list(range(1, 10, 2))
