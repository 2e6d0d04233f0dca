"""The housekeeping loop: what this process sets or delays wakes it when due, whatever the poll
interval; what it cannot know of (another process's timers) is found by the poll."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from choreograph import (
    App,
    Context,
    DeadlineExpired,
    Event,
    Middleware,
    Runtime,
    Service,
    VirtualClock,
    WorkerSettings,
)
from choreograph.envelope import decode, encode, new_envelope
from choreograph.store import Timer, store_from_url
from choreograph.transport import Delivery, Message, Subscription
from choreograph.transports.memory import MemoryTransport

# The store is polled once an hour: anything that happens sooner was woken by this process.
HOURLY = WorkerSettings(poll_interval=3600, housekeeping_interval=3600)


class Started(Event):
    key: str


class Confirmed(Event):
    key: str


class Reminded(Event):
    key: str


class Failed(Event):
    key: str


def watcher_app() -> App:
    watcher = Service("watcher")

    @watcher.deadline(starts_on=Started, expect=[Confirmed], within=30, emits=[Failed])
    async def confirmation_late(expired: DeadlineExpired, ctx: Context) -> Failed:
        return Failed(key=expired.key)

    @watcher.on(Started, emits=[Reminded])
    async def remind_later(event: Started, ctx: Context) -> None:
        ctx.emit_later(Reminded(key=event.key), 5)

    return App("housekeeping", [watcher], terminal=[Failed])


async def _received(subscription: Subscription) -> list[Delivery]:
    """What ``subscription`` holds now, polled in real time (the runtime's tasks need a few
    turns of the loop after the clock moved); [] after a generous guard."""
    for _ in range(300):
        got = await subscription.receive(10, 0)
        if got:
            return got
        await asyncio.sleep(0.01)
    return []


async def test_a_timer_and_a_delayed_event_of_this_process_are_taken_up_when_due(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="choreograph")
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    store = f"sqlite:///{tmp_path}/{{service}}.db"
    await bus.connect()
    seen = await bus.subscribe("observer", ["Failed", "Reminded"])
    async with Runtime(
        watcher_app(), transport=bus, store=store, clock=clock, settings=HOURLY
    ) as runtime:
        await runtime.publish(Started(key="a"), source="test", correlation_id="tx")
        for _ in range(300):  # handled: the timer is set
            if await runtime.worker("watcher").store.list_timers():
                break
            await asyncio.sleep(0.01)
        assert await seen.receive(10, 0) == []

        await clock.advance(6)
        (reminded,) = await _received(seen)
        assert decode(reminded.message.body).type == "Reminded"
        await seen.ack([reminded])

        await clock.advance(25)
        (failed,) = await _received(seen)
        assert decode(failed.message.body).type == "Failed"
        assert await runtime.worker("watcher").store.list_timers() == []

    # and no pass of the housekeeping failed on the way
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_timer_another_process_set_fires_by_the_next_poll(tmp_path: Path) -> None:
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    store = f"sqlite:///{tmp_path}/{{service}}.db"
    settings = WorkerSettings(poll_interval=3600, housekeeping_interval=10)
    await bus.connect()
    failures = await bus.subscribe("observer", ["Failed"])
    async with Runtime(watcher_app(), transport=bus, store=store, clock=clock, settings=settings):
        # another process (a replica) sets a timer in the same store, due in 1 s
        other = store_from_url(store.format(service="watcher"), "watcher")
        await other.open()
        try:
            async with other.transaction() as tx:
                cause = {"correlationid": "tx", "causationid": "e1", "type": "Started"}
                due = clock.now() + 1
                await tx.set_timer(Timer("deadline:confirmation_late", "tx", due, cause))
        finally:
            await other.close()
        await clock.advance(11)
        (failed,) = await _received(failures)
        assert decode(failed.message.body).correlationid == "tx"


async def test_an_event_delayed_in_a_batch_after_an_unreadable_message_goes_when_due(
    tmp_path: Path,
) -> None:
    # given a worker taking whole batches in one lane, polling its store once an hour
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    settings = WorkerSettings(concurrency=1, poll_interval=3600, housekeeping_interval=3600)
    await bus.connect()
    seen = await bus.subscribe("observer", ["Reminded"])
    async with Runtime(
        watcher_app(), transport=bus, store=f"sqlite:///{tmp_path}/{{service}}.db",
        clock=clock, settings=settings,
    ) as runtime:  # fmt: skip
        # when one batch holds a message that is no event, then one delaying a Reminded by 5 s
        started = new_envelope("Started", {"key": "b"}, source="test")
        await bus.publish([
            Message("junk", "Started", b"not an event"),
            Message(started.id, started.type, encode(started)),
        ])  # fmt: skip
        for _ in range(300):  # handled: the junk dead-lettered, the Started's timer set
            if await bus.dead_letters("watcher") and not bus.busy("watcher"):
                break
            await asyncio.sleep(0.01)
        assert await runtime.worker("watcher").store.list_timers() != []
        # then the Reminded goes out when due, not at the next poll of the store
        await clock.advance(6)
        (reminded,) = await _received(seen)
        assert decode(reminded.message.body).type == "Reminded"


async def test_a_failed_pass_is_reported_and_the_next_one_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # given a worker whose store fails once when asked for its next timer
    caplog.set_level(logging.WARNING, logger="choreograph")
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    await bus.connect()
    failures = await bus.subscribe("observer", ["Failed"])
    settings = WorkerSettings(poll_interval=3600, housekeeping_interval=10)
    async with Runtime(
        watcher_app(), transport=bus, store=f"sqlite:///{tmp_path}/{{service}}.db",
        clock=clock, settings=settings,
    ) as runtime:  # fmt: skip
        store = runtime.worker("watcher").store
        asked = store.next_timer_due
        broken = [RuntimeError("the store is gone")]

        async def next_timer_due() -> float | None:
            if broken:
                raise broken.pop()
            return await asked()

        store.next_timer_due = next_timer_due  # type: ignore[method-assign]
        # when a pass runs into it
        await clock.advance(11)
        for _ in range(300):
            if not broken and caplog.records:
                break
            await asyncio.sleep(0.01)
        # then the worker says so, and the next passes fire a timer set since
        assert [r.getMessage() for r in caplog.records] == [
            "watcher: housekeeping failed, will retry: the store is gone"
        ]
        await runtime.publish(Started(key="a"), source="test", correlation_id="tx")
        for _ in range(300):  # handled: the timer is set
            if await store.list_timers():
                break
            await asyncio.sleep(0.01)
        await clock.advance(31)
        (failed,) = await _received(failures)
        assert decode(failed.message.body).correlationid == "tx"


class _Observed(Middleware):
    """Records the transaction of each outcome its observers are told of."""

    def __init__(self) -> None:
        self.correlations: list[str] = []

    def on_outcome(self, ctx: Context, outcome: object) -> None:
        self.correlations.append(ctx.correlation_id)


async def test_the_second_of_two_timers_and_of_two_delayed_events_goes_when_due(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # given two transactions started 2 s apart, each delaying a Reminded by 5 s and expecting
    # a Confirmed within 30 s; the store polled once an hour
    caplog.set_level(logging.WARNING, logger="choreograph")
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    await bus.connect()
    seen = await bus.subscribe("observer", ["Failed", "Reminded"])
    observed = _Observed()
    async with Runtime(
        watcher_app(), transport=bus, store=f"sqlite:///{tmp_path}/{{service}}.db",
        clock=clock, settings=HOURLY, middleware=[observed],
    ) as runtime:  # fmt: skip
        store = runtime.worker("watcher").store

        async def start(key: str, timers: int) -> None:
            await runtime.publish(Started(key=key), source="test", correlation_id=f"tx-{key}")
            for _ in range(300):  # handled: its timer is set
                if len(await store.list_timers()) == timers:
                    return
                await asyncio.sleep(0.01)

        async def next_event() -> tuple[str, str]:
            (got,) = await _received(seen)
            await seen.ack([got])
            envelope = decode(got.message.body)
            return envelope.type, envelope.correlationid

        await start("a", 1)
        await clock.advance(2)
        await start("b", 2)
        # when the clock reaches each one's due time, then each goes out, the second too
        await clock.advance(4)
        assert await next_event() == ("Reminded", "tx-a")
        await clock.advance(2)
        assert await next_event() == ("Reminded", "tx-b")
        await clock.advance(23)
        assert await next_event() == ("Failed", "tx-a")
        await clock.advance(2)
        assert await next_event() == ("Failed", "tx-b")

    # and the observers were told of each deadline's outcome, in its transaction, and no pass
    # failed on the way
    assert observed.correlations[:2] == ["tx-a", "tx-b"]  # their Started
    assert sorted(set(observed.correlations[2:])) == ["tx-a", "tx-b"]  # their deadlines
    assert [r.getMessage() for r in caplog.records] == []


async def test_the_inbox_forgets_the_events_older_than_its_horizon_and_keeps_the_others(
    tmp_path: Path,
) -> None:
    # given a worker remembering handled events for 2000 s, pruning once an hour at most
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    settings = WorkerSettings(poll_interval=3600, housekeeping_interval=1000, inbox_horizon=2000)
    async with Runtime(
        watcher_app(), transport=bus, store=f"sqlite:///{tmp_path}/{{service}}.db",
        clock=clock, settings=settings,
    ) as runtime:  # fmt: skip
        store = runtime.worker("watcher").store

        async def seen(event_id: str) -> bool:
            async with store.transaction() as tx:
                return await tx.seen(event_id)

        async def handled(key: str) -> str:
            envelope = new_envelope("Started", {"key": key}, source="test")
            await bus.publish([Message(envelope.id, envelope.type, encode(envelope))])
            for _ in range(300):
                if await seen(envelope.id):
                    return envelope.id
                await asyncio.sleep(0.01)
            raise AssertionError(f"{key} was not handled")

        # when one event is handled now and another 3000 s later, and the clock moves on past
        # the next prune (an hour after the first, at start), 1100 s after the second event
        old = await handled("old")
        await clock.advance(3000)
        recent = await handled("recent")
        await clock.advance(1100)
        for _ in range(300):
            if not await seen(old):
                break
            await asyncio.sleep(0.01)

        # then the older one is forgotten (a duplicate of it would run again), the other kept
        assert not await seen(old)
        assert await seen(recent)
