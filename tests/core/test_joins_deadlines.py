"""Joins and deadlines: any arrival order, duplicates, timeouts, restarts, cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from choreograph import (
    App,
    Context,
    DeadlineExpired,
    Event,
    JoinTimedOut,
    Parts,
    Runtime,
    Service,
    VirtualClock,
    WorkerSettings,
)
from choreograph.envelope import decode
from choreograph.testing import Harness
from choreograph.transports.memory import MemoryTransport


class Started(Event):
    key: str


class Left(Event):
    key: str
    value: int


class Right(Event):
    key: str
    value: int


class Combined(Event):
    key: str
    total: int


class Failed(Event):
    key: str
    reason: str


class Confirmed(Event):
    key: str


def joining_app(*, on_timeout: bool = True, within: float = 10.0) -> App:
    merger = Service("merger")
    undo = Service("undo")
    seen: list[str] = []

    async def timed_out(timeout: JoinTimedOut, ctx: Context) -> Failed:
        return Failed(key=timeout.key, reason="missing " + ",".join(timeout.missing))

    @merger.join(
        Left,
        Right,
        key="key",
        within=within,
        on_timeout=timed_out if on_timeout else None,
        emits=[Combined, Failed],
    )
    async def combine(parts: Parts, ctx: Context) -> Combined:
        return Combined(key=parts.key, total=parts[Left].value + parts[Right].value)

    @undo.on(Left)
    async def did_left(event: Left, ctx: Context) -> None:
        await ctx.state.put("left", event.key, {"status": "done"})

    @undo.compensate(Failed, undoes=did_left)
    async def undo_left(event: Failed, ctx: Context) -> None:
        seen.append(event.key)
        doc = await ctx.state.get("left", event.key)
        if doc is not None:
            await ctx.state.put("left", event.key, {"status": "undone"})

    return App("joins", [merger, undo], terminal=[Combined, Failed])


@pytest.mark.parametrize("first", ["left", "right"])
async def test_a_join_completes_in_either_order(first: str) -> None:
    async with Harness(joining_app()) as h:
        parts = [Left(key="k", value=1), Right(key="k", value=2)]
        for part in parts if first == "left" else parts[::-1]:
            await h.publish(part, correlation_id="tx")
            await h.settle()
        combined = await h.wait_for(Combined)
        assert combined.data == {"key": "k", "total": 3}
        await h.advance(20)
        assert not h.published(Failed)  # the join's deadline was cancelled


async def test_duplicated_parts_are_ignored() -> None:
    async with Harness(joining_app()) as h:
        await h.publish(Left(key="k", value=1), correlation_id="tx")
        await h.publish(Left(key="k", value=100), correlation_id="tx")
        await h.publish(Right(key="k", value=2), correlation_id="tx")
        await h.publish(Right(key="k", value=200), correlation_id="tx")
        await h.settle()
        (combined,) = h.published(Combined)
        assert combined.data["total"] == 3


async def test_a_missing_part_fails_by_deadline_naming_it_and_compensation_runs() -> None:
    async with Harness(joining_app()) as h:
        await h.publish(Left(key="k", value=1), correlation_id="tx")
        await h.advance(9)
        assert not h.published(Failed)
        await h.advance(2)
        failed = await h.wait_for(Failed)
        assert failed.data == {"key": "k", "reason": "missing Right"}
        await h.settle()
        assert await h.state("undo", "left", "k") == {"status": "undone"}


async def test_without_on_timeout_the_runtime_publishes_join_timed_out() -> None:
    async with Harness(joining_app(on_timeout=False)) as h:
        await h.publish(Right(key="k", value=1), correlation_id="tx")
        await h.advance(11)
        timed_out = await h.wait_for(JoinTimedOut)
        assert timed_out.data["missing"] == ["Left"]
        assert timed_out.data["present"] == ["Right"]
        assert timed_out.data["parts"] == {"Right": {"key": "k", "value": 1}}


async def test_a_part_after_the_deadline_is_ignored_and_recorded() -> None:
    # (JoinTimedOut does not end the transaction; a part arriving after a terminal event is late
    # before it reaches the join: tests/core/test_late_events.py)
    async with Harness(joining_app(on_timeout=False)) as h:
        await h.publish(Left(key="k", value=1), correlation_id="tx")
        await h.advance(11)
        await h.wait_for(JoinTimedOut)
        await h.publish(Right(key="k", value=2), correlation_id="tx")
        await h.settle()
        assert not h.published(Combined)
        doc = await h.state("merger", "_join:combine", "k")
        assert doc is not None
        assert doc["status"] == "expired"
        assert [late["type"] for late in doc["late"]] == ["Right"]


def deadline_app() -> App:
    watcher = Service("watcher")

    @watcher.deadline(starts_on=Started, expect=[Confirmed], within=30, emits=[Failed])
    async def confirmation_late(expired: DeadlineExpired, ctx: Context) -> Failed:
        return Failed(key=expired.key, reason=f"no {expired.expected[0]} in time")

    return App("deadlines", [watcher], terminal=[Failed])


async def test_a_deadline_fires_when_nothing_arrives_and_not_when_it_does() -> None:
    async with Harness(deadline_app()) as h:
        await h.publish(Started(key="a"), correlation_id="late")
        await h.publish(Started(key="b"), correlation_id="on-time")
        await h.advance(10)
        await h.publish(Confirmed(key="b"), correlation_id="on-time")
        await h.advance(25)
        (failed,) = h.published(Failed)
        assert failed.correlationid == "late"
        assert failed.data["reason"] == "no Confirmed in time"


async def test_a_cancelled_deadline_never_fires() -> None:
    async with Harness(deadline_app()) as h:
        await h.publish(Started(key="a"), correlation_id="tx")
        await h.settle()
        store = h.runtime.worker("watcher").store
        (timer,) = await store.list_timers()
        assert (timer.name, timer.key) == ("deadline:confirmation_late", "tx")
        assert await store.cancel_timer(timer.name, timer.key)
        await h.advance(60)
        assert not h.published(Failed)


async def test_a_pending_deadline_survives_a_restart_and_fires_on_time(tmp_path: Path) -> None:
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)  # one bus object outlives both runtimes
    store = f"sqlite:///{tmp_path}/{{service}}.db"
    settings = WorkerSettings(poll_interval=3600, housekeeping_interval=0.5)

    def runtime() -> Runtime:
        return Runtime(deadline_app(), transport=bus, store=store, clock=clock, settings=settings)

    async with runtime() as first:
        await first.publish(Started(key="a"), source="test", correlation_id="tx")
        await clock.advance(1)
        assert len(await first.worker("watcher").store.list_timers()) == 1
    # everything is stopped; time passes; a new process starts
    await clock.advance(10)
    await bus.connect()
    failures = await bus.subscribe("observer", ["Failed"])
    async with runtime():
        await clock.advance(15)
        assert await failures.receive(10, 0) == []
        for _ in range(10):
            await clock.advance(1)
        (fired,) = await failures.receive(10, 0)
        assert b"no Confirmed in time" in fired.message.body


async def test_the_cli_lists_and_cancels_pending_deadlines(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from choreograph.cli import main

    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    store = f"sqlite:///{tmp_path}/{{service}}.db"
    settings = WorkerSettings(poll_interval=3600, housekeeping_interval=0.5)

    def runtime() -> Runtime:
        return Runtime(deadline_app(), transport=bus, store=store, clock=clock, settings=settings)

    async with runtime() as first:
        await first.publish(Started(key="a"), source="test", correlation_id="tx-a")
        await first.publish(Started(key="b"), source="test", correlation_id="tx-b")
        await clock.advance(1)

    runner = CliRunner()
    listed = await asyncio.to_thread(
        runner.invoke, main, ["timers", "list", "-s", "watcher", "--store", store, "--json"]
    )
    assert listed.exit_code == 0, listed.output
    assert sorted(line.split('"key":"')[1][:4] for line in listed.output.splitlines()) == [
        "tx-a",
        "tx-b",
    ]
    cancelled = await asyncio.to_thread(
        runner.invoke,
        main,
        [
            "timers",
            "cancel",
            "deadline:confirmation_late",
            "tx-a",
            "-s",
            "watcher",
            "--store",
            store,
        ],
    )
    assert cancelled.exit_code == 0, cancelled.output

    await bus.connect()
    failures = await bus.subscribe("observer", ["Failed"])
    async with runtime():
        for _ in range(40):
            await clock.advance(1)
        fired = await failures.receive(10, 0)
    assert [decode(d.message.body).correlationid for d in fired] == ["tx-b"]


async def test_a_compensation_that_finally_fails_is_dead_lettered_and_announced() -> None:
    from choreograph import CompensationFailed, RetryPolicy

    worker = Service("worker", retry=RetryPolicy(max_attempts=2, immediate=1))

    @worker.on(Left)
    async def do_left(event: Left, ctx: Context) -> None:
        await ctx.state.put("left", event.key, {"status": "done"})

    @worker.compensate(Failed, undoes=do_left)
    async def undo_left(event: Failed, ctx: Context) -> None:
        raise RuntimeError("the undo service is down")

    async with Harness(App("comp", [worker], terminal=[Failed])) as h:
        await h.publish(Left(key="k", value=1), correlation_id="tx")
        await h.publish(Failed(key="k", reason="boom"), correlation_id="tx")
        announced = await h.wait_for(CompensationFailed, correlation_id="tx")
        assert announced.data["compensation"] == "undo_left"
        assert announced.data["failed_event_type"] == "Failed"
        assert announced.data["attempts"] == 2
        (dead,) = await h.dead_letters("worker")
        assert dead.message.topic == "Failed"
        assert dead.failure.error == "the undo service is down"
