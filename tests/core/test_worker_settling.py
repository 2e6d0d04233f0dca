"""What a service's worker does after the handling: the order of its checkpoints, how many
messages it holds, how it settles a poison message and a dead letter the bus refuses, and what a
stop finishes, hands back and keeps for the next start. On the memory bus and a virtual clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from choreograph import (
    App,
    ConfigurationError,
    Context,
    DeadlineExpired,
    Event,
    Middleware,
    Parts,
    PermanentFailure,
    RetryLater,
    RetryPolicy,
    Runtime,
    Service,
    VirtualClock,
    WorkerSettings,
)
from choreograph.envelope import MAX_EVENT_BYTES, Envelope, decode, encode, new_envelope
from choreograph.errors import TransportError
from choreograph.middleware import Checkpoint
from choreograph.runtime.outbox import FAST_PATH_CLAIM, stage
from choreograph.runtime.worker import HAND_BACKS, POISON_ATTEMPTS
from choreograph.service import CORRELATION
from choreograph.store import DocumentBusy, StoreTx, store_from_url
from choreograph.transport import Delivery, Failure, Message
from choreograph.transports.memory import MemorySubscription, MemoryTransport
from tests.support.quiet import wait_until_quiet

#: Like the Harness: receives wake on a publish or on virtual time, never on a real-time poll.
VIRTUAL = WorkerSettings(
    concurrency=1, batch_size=50, poll_interval=3600, housekeeping_interval=1000
)


class Ping(Event):
    n: int


class Pong(Event):
    n: int


def ping(n: int, event_id: str | None = None, key: str = "") -> Message:
    envelope = Envelope(
        id=event_id or str(uuid.uuid4()), type="Ping", source="test",
        correlationid=key or f"c{n}", data={"n": n},
    )  # fmt: skip
    return Message(envelope.id, envelope.type, encode(envelope))


async def wait_for(check: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll ``check`` until it is truthy (the timeout only guards against a hang)."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - polls other tasks' state
            await asyncio.sleep(0.01)


class Observer(Middleware):
    """Records what an operator's observer is told."""

    def __init__(self) -> None:
        self.points: list[tuple[str, Checkpoint]] = []
        self.invalid: list[tuple[str, bytes, Failure]] = []

    def checkpoint(self, service: str, point: Checkpoint) -> None:
        self.points.append((service, point))

    def on_invalid(self, service: str, body: bytes, failure: Failure) -> None:
        self.invalid.append((service, body, failure))


def worker_logs(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "choreograph.worker" and r.levelno == level
    ]


# checkpoints and messages in hand --------------------------------------------------------------


async def test_a_handling_passes_its_checkpoints_in_order_and_warns_of_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given a service that answers each Ping with a Pong, watched by an observer
    caplog.set_level(logging.INFO, logger="choreograph")
    pong = Service("pong")

    @pong.on(Ping, emits=[Pong])
    async def answer(event: Ping, ctx: Context) -> Pong:
        return Pong(n=event.n)

    observer = Observer()
    bus = MemoryTransport()
    await bus.declare_group("reader", ["Pong"])
    runtime = Runtime(App("points", [pong]), transport=bus, store="memory://",
                      middleware=[observer], settings=WorkerSettings(concurrency=1))  # fmt: skip

    # when one Ping is handled
    async with runtime:
        await bus.publish([ping(1)])
        await wait_for(lambda: ("pong", "settled") in observer.points)
        await wait_until_quiet(runtime)

    # then its batch was handled, committed, its Pong published, then the Ping settled; and a
    # healthy batch makes the worker warn of nothing
    assert observer.points == [
        ("pong", "handled"), ("pong", "committed"), ("pong", "published"), ("pong", "settled")
    ]  # fmt: skip
    assert await bus.lag("reader") == 1
    assert worker_logs(caplog, logging.WARNING) == []


async def test_the_worker_counts_every_message_it_holds_across_its_lanes() -> None:
    # given a service with two lanes of one message each, whose handler waits to be released
    started: list[int] = []
    release = asyncio.Event()
    pong = Service("pong")

    @pong.on(Ping)
    async def slow(event: Ping, ctx: Context) -> None:
        started.append(event.n)
        await release.wait()

    bus = MemoryTransport()
    runtime = Runtime(App("held", [pong]), transport=bus, store="memory://",
                      settings=WorkerSettings(concurrency=2, batch_size=1))  # fmt: skip
    async with runtime:
        worker = runtime.workers["pong"]
        try:
            # when two messages are in hand at once, one in each lane (the second lane waits
            # for the store, which the first one's transaction holds)
            await bus.publish([ping(1), ping(2)])
            # then the worker holds both
            await wait_for(lambda: worker.inflight == 2)
            assert len(started) == 1
        finally:
            release.set()
        # and once they are settled, none
        await wait_until_quiet(runtime)
        assert worker.inflight == 0
        assert sorted(started) == [1, 2]
    assert await bus.lag("pong") == 0


# a poison message ---------------------------------------------------------------------


def refuse_in_inbox(path: Path, reason: str) -> None:
    """The store itself refuses, at commit, the inbox row of any event id 'refused-...'."""
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TRIGGER refused BEFORE INSERT ON inbox WHEN NEW.event_id LIKE 'refused-%' "
        f"BEGIN SELECT RAISE(ABORT, '{reason}'); END"
    )
    db.commit()
    db.close()


async def test_a_poison_message_waits_for_the_service_retry_delay_then_is_announced(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # given a service retrying after 30 s, whose store refuses one event with a long reason
    caplog.set_level(logging.INFO, logger="choreograph")
    handled: list[int] = []
    pong = Service("pong", retry=RetryPolicy(max_attempts=9, immediate=0, base_delay=30,
                                             max_delay=30, jitter=0))  # fmt: skip

    @pong.on(Ping)
    async def count(event: Ping, ctx: Context) -> None:
        handled.append(event.n)

    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    observer = Observer()
    runtime = Runtime(App("poison", [pong]), transport=bus, clock=clock, middleware=[observer],
                      store=f"sqlite:///{tmp_path}/{{service}}.db", settings=VIRTUAL)  # fmt: skip
    reason = "this store refuses the row " + "x" * 2100
    poison = ping(99, event_id=f"refused-{uuid.uuid4()}")
    async with runtime:
        refuse_in_inbox(tmp_path / "pong.db", reason)
        worker = runtime.workers["pong"]

        def quiet() -> bool:
            return not worker.inflight and not bus.busy("pong")

        # when it comes in one batch with two others
        await bus.publish([ping(0), poison, ping(1)])
        await wait_for(lambda: handled.count(99) >= 2 and quiet())

        # then the others went through; the poison failed in its batch and alone, and waits
        # for the service's retry delay: not before 30 s
        assert sorted(n for n in handled if n != 99) == [0, 0, 1, 1]  # in the batch, then alone
        assert handled.count(99) == 2
        assert await bus.lag("pong") == 1
        await clock.advance(29)
        await wait_for(quiet)
        assert handled.count(99) == 2
        assert await bus.dead_letters() == []

        # when its delays pass, it is delivered again, and at its last attempt dead-lettered
        await clock.advance(1)
        await wait_for(lambda: handled.count(99) == 4 and quiet())
        await clock.advance(30)
        await wait_for(lambda: observer.invalid and quiet())

    # then the dead letter and the observer say why, in a bounded text
    [letter] = await bus.dead_letters("pong")
    assert letter.message.id == poison.id
    assert letter.attempts == POISON_ATTEMPTS
    failure = letter.failure
    assert (failure.reason, failure.error_type) == ("poison message", "IntegrityError")
    assert failure.error == f"its store transaction fails on its own: {reason}"[:2000]
    assert observer.invalid == [("pong", poison.body, failure)]
    # and the operator's log says which batch broke, and which message went to the dead letters
    warnings = worker_logs(caplog, logging.WARNING)
    assert warnings[0].startswith(
        "pong: a batch of 3 failed (IntegrityError: this store refuses the row xxx"
    )
    assert warnings[0].endswith("); handling its messages one at a time")
    assert worker_logs(caplog, logging.ERROR) == [
        f"pong: message {poison.id} dead-lettered: {failure.error}"
    ]


@pytest.mark.parametrize("lost_at", ["in its batch", "when handled alone"])
async def test_a_store_lost_while_handling_is_what_the_worker_reports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, lost_at: str
) -> None:
    # given a service whose store refuses one event, and is closed under it by the handler, in
    # the batch's transaction or in the event's own (once the batch failed)
    caplog.set_level(logging.INFO, logger="choreograph")
    pong = Service("pong")
    calls: list[int] = []
    runtime: Runtime

    @pong.on(Ping)
    async def lose_the_store(event: Ping, ctx: Context) -> None:
        calls.append(event.n)
        if len(calls) == (1 if lost_at == "in its batch" else 2):
            await runtime.workers["pong"].store.close()

    bus = MemoryTransport()
    runtime = Runtime(App("lost", [pong]), transport=bus,
                      store=f"sqlite:///{tmp_path}/{{service}}.db",
                      settings=WorkerSettings(concurrency=1, lease=300))  # fmt: skip
    async with runtime:
        refuse_in_inbox(tmp_path / "pong.db", "this store refuses the row")
        # when the event is handled
        await bus.publish([ping(1, event_id=f"refused-{uuid.uuid4()}")])
        await wait_for(lambda: any(r.exc_info for r in caplog.records))
        [failed] = [r for r in caplog.records if r.exc_info]

        # then nothing is settled, and the error logged is the store's own
        assert failed.getMessage().startswith("pong: batch failed")
        assert failed.exc_info is not None
        assert "closed database" in str(failed.exc_info[1])
        assert await bus.dead_letters() == []
        assert bus.busy("pong") == 1
        await runtime.workers["pong"].store.open()


# a dead letter the bus refuses -----------------------------------------------------------------


async def _subscribe(
    bus: MemoryTransport,
    kind: type[MemorySubscription],
    group: str,
    topics: Collection[str],
    lease: float,
) -> MemorySubscription:
    """Subscribe to ``bus`` as MemoryTransport.subscribe does, with a member of ``kind``."""
    bus._check_open()
    await bus.declare_group(group, topics)
    sub = kind(bus, group, frozenset(topics), lease)
    bus._subscriptions.add(sub)
    return sub


class _RefusingSubscription(MemorySubscription):
    async def dead_letter(self, delivery: Delivery, failure: Failure) -> None:
        if len(failure.error) > 200 or not failure.error.isascii() or len(failure.error_type) > 100:
            raise ValueError("this bus keeps at most 200 ASCII characters of an error")
        await super().dead_letter(delivery, failure)


class _Refusing(MemoryTransport):
    """A bus with a rule of its own about dead letters (as a database column has a size and a
    character set): it refuses a failure text longer than 200 ASCII characters."""

    async def subscribe(
        self, group: str, topics: Collection[str], *, lease: float = 30.0
    ) -> MemorySubscription:
        return await _subscribe(self, _RefusingSubscription, group, topics, lease)


async def test_a_dead_letter_the_bus_refuses_is_recorded_with_a_shorter_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given a handler refusing an event for good with a long, non-ASCII reason, raised as an
    # error whose type has a long name, on a bus that keeps only short ASCII failures
    caplog.set_level(logging.INFO, logger="choreograph")
    long_named = type("Declined" + "E" * 150, (PermanentFailure,), {})
    pong = Service("pong")

    @pong.on(Ping)
    async def refuse(event: Ping, ctx: Context) -> None:
        raise long_named("déclinée " * 50)

    bus = _Refusing()
    runtime = Runtime(App("refusing", [pong]), transport=bus, store="memory://",
                      settings=WorkerSettings(concurrency=1))  # fmt: skip
    message = ping(1)
    async with runtime:
        # when it is dead-lettered
        await bus.publish([message])
        await wait_for(lambda: bus._dead)
        await wait_until_quiet(runtime)

    # then the dead letter holds the message with a bounded failure, and the log says why
    [letter] = await bus.dead_letters("pong")
    assert letter.message.id == message.id
    assert letter.failure.reason == "permanent failure"
    assert letter.failure.error_type == long_named.__name__[:100]
    assert letter.failure.error == ("déclinée " * 50)[:200].replace("é", "?")
    assert letter.failure.traceback == ""
    warnings = worker_logs(caplog, logging.WARNING)
    assert warnings == [
        f"pong: dead letter of {message.id} refused (this bus keeps at most 200 ASCII "
        "characters of an error); recording a shorter reason"
    ]


# stopping ---------------------------------------------------------------------


async def test_stop_finishes_the_batch_in_hand() -> None:
    # given a service whose handler is halfway through a message when the runtime stops
    entered, release = asyncio.Event(), asyncio.Event()
    pong = Service("pong")

    @pong.on(Ping, emits=[Pong])
    async def slow(event: Ping, ctx: Context) -> Pong:
        entered.set()
        await release.wait()
        await ctx.state.put("seen", str(event.n), {"n": event.n})
        return Pong(n=event.n)

    bus = MemoryTransport()
    await bus.declare_group("reader", ["Pong"])
    runtime = Runtime(App("stopping", [pong]), transport=bus, store="memory://",
                      settings=WorkerSettings(concurrency=1, lease=300))  # fmt: skip
    await runtime.start()
    await bus.publish([ping(7)])
    await asyncio.wait_for(entered.wait(), 30)
    worker = runtime.workers["pong"]

    # when the runtime stops, and only then the handler finishes
    stopping = asyncio.create_task(runtime.stop())
    await wait_for(lambda: worker._stopping.is_set())
    release.set()
    await asyncio.wait_for(stopping, 30)

    # then the message was handled to the end: its Pong published, the Ping settled
    assert await bus.lag("reader") == 1
    assert await bus.lag("pong") == 0
    assert bus.busy("pong") == 0
    assert await bus.dead_letters() == []


async def test_removing_a_service_hands_back_what_waits_for_its_key(tmp_path: Path) -> None:
    # given an ordered service that received two events of one key and handles the first
    entered, release = asyncio.Event(), asyncio.Event()
    handled: list[int] = []
    pong = Service("pong")

    @pong.on(Ping, ordered_by=CORRELATION)
    async def slow(event: Ping, ctx: Context) -> None:
        handled.append(event.n)
        entered.set()
        await release.wait()

    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    runtime = Runtime(App("ordered", [pong]), transport=bus, clock=clock, settings=VIRTUAL,
                      store=f"sqlite:///{tmp_path}/{{service}}.db")  # fmt: skip
    async with runtime:
        await bus.publish([ping(1, key="k"), ping(2, key="k")])
        await asyncio.wait_for(entered.wait(), 30)

        # when the service is removed while the second waits for the first
        release.set()
        await runtime.remove_service("pong")

        # then the first was handled, and the second is back on the bus at once (not at the end
        # of its lease), for the next member of the group
        assert handled == [1]
        assert bus.busy("pong") == 1
        assert await bus.lag("pong") == 1
        await runtime.add_service(pong)
        await wait_for(lambda: handled == [1, 2])
        await wait_until_quiet(runtime)


async def test_an_ordered_key_goes_on_after_a_batch_that_did_not_commit(tmp_path: Path) -> None:
    # given an ordered service whose store is lost during the first handling of a key's event
    handled: list[int] = []
    pong = Service("pong")
    runtime: Runtime

    @pong.on(Ping, ordered_by=CORRELATION)
    async def count(event: Ping, ctx: Context) -> None:
        handled.append(event.n)
        if len(handled) == 1:
            await runtime.workers["pong"].store.close()

    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    runtime = Runtime(App("ordered", [pong]), transport=bus, clock=clock, settings=VIRTUAL,
                      store=f"sqlite:///{tmp_path}/{{service}}.db")  # fmt: skip
    async with runtime:
        worker = runtime.workers["pong"]
        await bus.publish([ping(1, key="k")])
        await wait_for(lambda: handled == [1] and not worker.inflight)
        await worker.store.open()

        # when the store is back and the event's lease runs out
        await clock.advance(VIRTUAL.lease)

        # then it comes back and is handled: its key did not stay blocked
        await wait_for(lambda: handled == [1, 1] and not worker.inflight)
        await wait_until_quiet(runtime)
    assert await bus.dead_letters() == []


class _Lost(MemoryTransport):
    """A bus whose connection can be lost: then it refuses everything with a transport error."""

    lost = False
    refused = 0

    async def publish(self, messages: object) -> None:
        if self.lost:
            self.refused += 1
            raise TransportError("connection lost")
        await super().publish(messages)  # type: ignore[arg-type]

    async def subscribe(
        self, group: str, topics: Collection[str], *, lease: float = 30.0
    ) -> MemorySubscription:
        return await _subscribe(self, _LostSubscription, group, topics, lease)

    async def close(self) -> None:
        if not self.lost:
            await super().close()


class _LostSubscription(MemorySubscription):
    async def close(self) -> None:
        if self._bus.lost:  # type: ignore[attr-defined]
            raise TransportError("connection lost")
        await super().close()


async def test_stop_with_the_bus_lost_keeps_the_outbox_for_the_next_start(tmp_path: Path) -> None:
    # given a service with an event in its outbox, due, whose bus connection is lost
    pong = Service("pong")

    @pong.on(Ping, emits=[Pong])
    async def answer(event: Ping, ctx: Context) -> Pong:
        return Pong(n=event.n)

    clock = VirtualClock()
    app = App("lost", [pong])
    store = f"sqlite:///{tmp_path}/{{service}}.db"
    pending = new_envelope("Pong", {"n": 5}, source="pong")
    own = store_from_url(store, "pong")
    await own.open()
    async with own.transaction() as tx:  # (as left by a publish that failed 20 s ago)
        await stage(tx, [(pending, 0.0)], limit=MAX_EVENT_BYTES, now=clock.now() - 20)
    await own.close()
    bus = _Lost(clock=clock)
    bus.lost = True
    runtime = Runtime(app, transport=bus, store=store, clock=clock, settings=VIRTUAL)
    await runtime.start()
    await wait_for(lambda: bus.refused == 1)  # the relay's first round; it claimed the row
    await clock.advance(WorkerSettings().relay_lease)  # the claim lapsed

    # when the runtime stops: neither the give-back nor the last relay reaches the bus
    await runtime.stop()

    # then the stop tried the relay and completed, and the event goes out after the next
    # start, on a bus that works
    assert bus.refused == 2
    bus = _Lost(clock=clock)
    await bus.declare_group("reader", ["Pong"])
    again = Runtime(app, transport=bus, store=store, clock=clock, settings=VIRTUAL)
    async with again:
        reader = await bus.subscribe("reader", ["Pong"])
        await clock.advance(VIRTUAL.housekeeping_interval)  # its next round: the claim lapsed
        [delivery] = await asyncio.wait_for(reader.receive(10, 30), 30)
    assert decode(delivery.message.body).id == pending.id


# settling each outcome ---------------------------------------------------------------------


class Done(Event):
    n: int


class Outcomes(Middleware):
    """Records each handling's outcome kind, by event type."""

    def __init__(self) -> None:
        self.kinds: list[tuple[str, str]] = []

    def on_outcome(self, ctx: Context, outcome: object) -> None:
        self.kinds.append((ctx.envelope.type, outcome.kind))  # type: ignore[attr-defined]


async def test_duplicates_ignored_and_late_events_are_acknowledged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given a service whose transactions end with Done, joining a Ping and a Pong
    caplog.set_level(logging.INFO, logger="choreograph")
    pong = Service("pong")

    @pong.join(Ping, Pong, emits=[Done])
    async def both(parts: Parts, ctx: Context) -> Done:
        return Done(n=parts[Ping].n)

    @pong.on(Done)
    async def done(event: Done, ctx: Context) -> None:
        pass

    outcomes = Outcomes()
    bus = MemoryTransport()
    runtime = Runtime(App("kinds", [pong], terminal=[Done]), transport=bus, store="memory://",
                      middleware=[outcomes], settings=WorkerSettings(concurrency=1))  # fmt: skip
    first = ping(1)
    ended = Envelope(id="done-1", type="Done", source="test", correlationid="c2", data={"n": 2})

    async def handle(message: Message, kind: str) -> None:
        await bus.publish([message])
        await wait_for(lambda: (message.topic, kind) in outcomes.kinds[-1:])
        # The worker tells its observers once it has settled: the message is acknowledged now.
        # (Waiting for the bus to be quiet instead would let a message left unacknowledged
        # come back after its 30 s lease, as a duplicate, and be acknowledged then.)
        assert bus.busy("pong") == 0, kind
        await wait_for(lambda: not runtime.workers["pong"].inflight)

    async with runtime:
        # when an event comes twice, a join part twice, and one after its transaction ended
        await handle(first, "done")  # the join keeps it and waits for its Pong
        await handle(first, "duplicate")
        await handle(ping(1), "ignored")  # the join already has a Ping
        await handle(Message(ended.id, ended.type, encode(ended)), "done")
        await handle(ping(2), "late")

    # then each was acknowledged: nothing is left on the bus, nothing warned
    assert await bus.lag("pong") == 0
    assert worker_logs(caplog, logging.WARNING) == []


class _Unsettling(MemoryTransport):
    """A bus whose connection drops once, when a retry is asked of it."""

    dropped = 0

    async def subscribe(
        self, group: str, topics: Collection[str], *, lease: float = 30.0
    ) -> MemorySubscription:
        return await _subscribe(self, _UnsettlingSubscription, group, topics, lease)


class _UnsettlingSubscription(MemorySubscription):
    async def retry(self, delivery: Delivery, delay: float) -> None:
        bus: _Unsettling = self._bus  # type: ignore[assignment]
        if not bus.dropped:
            bus.dropped += 1
            raise TransportError("connection dropped")
        await super().retry(delivery, delay)


async def test_a_settlement_the_bus_drops_leaves_the_others_settled_and_the_message_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given a service failing once on one event of a batch, on a bus that drops that retry
    caplog.set_level(logging.INFO, logger="choreograph")
    handled: list[int] = []
    pong = Service("pong", retry=RetryPolicy(max_attempts=3, immediate=1))

    @pong.on(Ping)
    async def flaky(event: Ping, ctx: Context) -> None:
        handled.append(event.n)
        if event.n == 1 and ctx.attempt == 1:
            raise ConnectionError("unreachable")

    clock = VirtualClock()
    bus = _Unsettling(clock=clock)
    runtime = Runtime(App("dropped", [pong]), transport=bus, store="memory://", clock=clock,
                      settings=VIRTUAL)  # fmt: skip
    failing = ping(1)
    async with runtime:
        worker = runtime.workers["pong"]
        # when the batch is settled
        await bus.publish([ping(0), failing, ping(2)])
        await wait_for(lambda: bus.dropped and not worker.inflight)

        # then the others were acknowledged, the failing one is still leased, and the worker
        # said which settlement failed, and backed off as from any transport error
        assert bus.busy("pong") == 1
        assert await bus.lag("pong") == 0
        assert worker_logs(caplog, logging.WARNING)[:2] == [
            f"pong: could not settle {failing.id} (retry): connection dropped",
            "pong: transport error, retrying in 0.1s: connection dropped",
        ]
        # and it comes back after its lease, and is handled
        await clock.advance(VIRTUAL.lease)
        await wait_for(lambda: handled.count(1) == 2 and not bus.busy("pong"))
    assert sorted(handled) == [0, 1, 1, 2]


class _Refusing2(MemoryTransport):
    """A bus that refuses, with a transport error, what is published on a closed topic."""

    closed_topics: set[str] = set()

    async def publish(self, messages: object) -> None:
        if any(m.topic in self.closed_topics for m in messages):  # type: ignore[attr-defined]
            raise TransportError(f"topics {sorted(self.closed_topics)} closed")
        await super().publish(messages)  # type: ignore[arg-type]


async def test_an_event_whose_publish_fails_after_the_commit_goes_out_with_the_relay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given a service answering Ping with Pong, on a bus refusing Pong for now
    caplog.set_level(logging.INFO, logger="choreograph")
    pong = Service("pong")

    @pong.on(Ping, emits=[Pong])
    async def answer(event: Ping, ctx: Context) -> Pong:
        return Pong(n=event.n)

    clock = VirtualClock()
    bus = _Refusing2(clock=clock)
    bus.closed_topics = {"Pong"}
    await bus.declare_group("reader", ["Pong"])
    runtime = Runtime(App("relayed", [pong]), transport=bus, store="memory://", clock=clock,
                      settings=VIRTUAL)  # fmt: skip
    async with runtime:
        # when a Ping is handled
        await bus.publish([ping(3)])
        await wait_for(lambda: worker_logs(caplog, logging.WARNING))

        # then the Ping was settled, the worker said the publish failed
        assert worker_logs(caplog, logging.WARNING) == [
            "pong: publish failed, the outbox relay will retry: topics ['Pong'] closed"
        ]
        await wait_for(lambda: not bus.busy("pong"))
        assert await bus.lag("reader") == 0
        # and once the bus takes Pong again, the relay publishes it when the claim of the
        # worker's failed publish runs out (long before the next poll of the outbox)
        bus.closed_topics = set()
        assert VIRTUAL.housekeeping_interval > FAST_PATH_CLAIM
        await clock.advance(FAST_PATH_CLAIM)
        await wait_for(lambda: bus.busy("reader") == 1)


async def test_a_short_retry_of_an_ordered_event_stays_in_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given an ordered service asking for one event to be retried in 2 s, within its lease
    caplog.set_level(logging.INFO, logger="choreograph")
    handled: list[tuple[int, int]] = []
    pong = Service("pong")

    @pong.on(Ping, ordered_by=CORRELATION)
    async def later(event: Ping, ctx: Context) -> None:
        handled.append((event.n, ctx.attempt))
        if ctx.attempt == 1:
            raise RetryLater("not yet", delay=2)

    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    runtime = Runtime(App("kept", [pong]), transport=bus, store="memory://", clock=clock,
                      settings=VIRTUAL)  # fmt: skip
    async with runtime:
        worker = runtime.workers["pong"]
        # when it fails once
        await bus.publish([ping(4, key="k")])
        await wait_for(lambda: handled and worker.inflight == 1)

        # then it is kept, unsettled, not sent back through the bus
        assert bus.busy("pong") == 1
        assert await bus.lag("pong") == 0
        # and handled again, as its second attempt, once its delay passed; then acknowledged
        await clock.advance(2)
        await wait_for(lambda: len(handled) == 2 and not bus.busy("pong"))
    assert handled == [(4, 1), (4, 2)]
    assert worker_logs(caplog, logging.WARNING) == worker_logs(caplog, logging.ERROR) == []


# what a worker is started with -----------------------------------------------------------------


class Big(Event):
    text: str


async def test_a_service_keeps_within_its_bus_message_size(tmp_path: Path) -> None:
    # given a bus taking messages of at most 4 KiB, and a handler emitting a bigger event
    pong = Service("pong")

    @pong.on(Ping, emits=[Big])
    async def answer(event: Ping, ctx: Context) -> Big:
        return Big(text="x" * 5000)

    bus = MemoryTransport()
    bus.max_message_bytes = 4096
    runtime = Runtime(App("small", [pong]), transport=bus, store="memory://",
                      settings=WorkerSettings(concurrency=1))  # fmt: skip
    message = ping(1)
    async with runtime:
        # when a Ping is handled
        await bus.publish([message])
        await wait_for(lambda: bus._dead)
        await wait_until_quiet(runtime)

    # then its handling failed on the bus' own limit: the Ping is dead-lettered, nothing emitted
    [letter] = await bus.dead_letters()
    assert (letter.group, letter.message.id) == ("pong", message.id)
    assert "4096" in letter.failure.error


async def test_a_received_message_stays_reserved_for_the_worker_lease() -> None:
    # given a service with a lease of 300 s, halfway through a message
    entered, release = asyncio.Event(), asyncio.Event()
    pong = Service("pong")

    @pong.on(Ping)
    async def slow(event: Ping, ctx: Context) -> None:
        entered.set()
        await release.wait()

    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    settings = WorkerSettings(concurrency=1, lease=300, poll_interval=3600,
                              housekeeping_interval=1000)  # fmt: skip
    runtime = Runtime(App("leased", [pong]), transport=bus, store="memory://", clock=clock,
                      settings=settings)  # fmt: skip
    async with runtime:
        await bus.publish([ping(1)])
        await asyncio.wait_for(entered.wait(), 30)
        try:
            # when 60 s pass
            await clock.advance(60)
            # then another member of the group gets nothing: the message is still reserved
            other = await bus.subscribe("pong", ["Ping"])
            assert await other.receive(10, 0) == []
            await other.close()
        finally:
            release.set()
        await wait_until_quiet(runtime)


async def test_an_ordered_service_holds_at_most_twice_its_lanes_batches() -> None:
    # given an ordered service with two lanes of one message, whose first event of a key waits
    entered, release = asyncio.Event(), asyncio.Event()
    pong = Service("pong")

    @pong.on(Ping, ordered_by=CORRELATION)
    async def slow(event: Ping, ctx: Context) -> None:
        entered.set()
        await release.wait()

    bus = MemoryTransport()
    runtime = Runtime(App("capacity", [pong]), transport=bus, store="memory://",
                      settings=WorkerSettings(concurrency=2, batch_size=1))  # fmt: skip
    async with runtime:
        worker = runtime.workers["pong"]
        try:
            # when ten events of that key arrive
            await bus.publish([ping(n, key="k") for n in range(10)])
            await asyncio.wait_for(entered.wait(), 30)
            # then the worker takes one in hand and four more waiting (2 lanes x 1 x 2), and
            # leaves the rest on the bus for the group's other members
            await wait_for(lambda: worker.inflight == 5)
            assert await bus.lag("pong") == 5
        finally:
            release.set()
        await wait_until_quiet(runtime)


class _Failing(MemoryTransport):
    """A bus whose receives fail with the errors in ``errors``, one per receive (None: works)."""

    errors: list[Exception | None] = []

    async def subscribe(
        self, group: str, topics: Collection[str], *, lease: float = 30.0
    ) -> MemorySubscription:
        return await _subscribe(self, _FailingSubscription, group, topics, lease)


class _FailingSubscription(MemorySubscription):
    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        errors = self._bus.errors  # type: ignore[attr-defined]
        error = errors.pop(0) if errors else None
        if error is not None:
            raise error
        return await super().receive(max_messages, timeout)


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (
            TransportError("connection lost"),
            "pong: transport error, retrying in {}s: connection lost",
        ),
        (RuntimeError("a bug"), "pong: batch failed, retrying in {}s"),
    ],
)
async def test_a_lane_backs_off_on_failures_and_starts_over_after_a_success(
    caplog: pytest.LogCaptureFixture, error: Exception, said: str
) -> None:
    # given a service whose bus fails three receives in a row, works once, then fails again
    caplog.set_level(logging.INFO, logger="choreograph")
    pong = Service("pong")

    @pong.on(Ping)
    async def count(event: Ping, ctx: Context) -> None:
        pass

    bus = _Failing()
    bus.errors = [error, error, error, None, error]
    runtime = Runtime(App("backoff", [pong]), transport=bus, store="memory://",
                      settings=WorkerSettings(concurrency=1, poll_interval=0.05))  # fmt: skip
    # when it runs until every failure happened
    async with runtime:
        await wait_for(
            lambda: (
                not bus.errors
                and len(worker_logs(caplog, logging.WARNING) + worker_logs(caplog, logging.ERROR))
                == 4
            )
        )
    # then it waited longer after each failure, and started over after the success
    logged = worker_logs(caplog, logging.WARNING) + worker_logs(caplog, logging.ERROR)
    assert logged == [said.format(s) for s in ("0.1", "0.2", "0.4", "0.1")]


async def test_stopping_an_idle_worker_reports_nothing(caplog: pytest.LogCaptureFixture) -> None:
    # given a service waiting for messages in a long receive
    caplog.set_level(logging.INFO, logger="choreograph")
    pong = Service("pong")

    @pong.on(Ping)
    async def count(event: Ping, ctx: Context) -> None:
        pass

    bus = MemoryTransport()
    runtime = Runtime(App("idle", [pong]), transport=bus, store="memory://",
                      settings=WorkerSettings(concurrency=2, poll_interval=3600))  # fmt: skip
    await runtime.start()
    # when it stops
    await asyncio.wait_for(runtime.stop(), 30)
    # then its receives were cancelled quietly
    assert worker_logs(caplog, logging.WARNING) == worker_logs(caplog, logging.ERROR) == []


class _Tables(DeclarativeBase):
    pass


class _Row(_Tables):
    __tablename__ = "pings"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)


async def test_a_service_own_tables_are_created_when_it_starts(tmp_path: Path) -> None:
    # given a service keeping each Ping in a table of its own (SQLAlchemy), on a new database
    pong = Service("pong", tables=_Tables.metadata)

    @pong.on(Ping)
    async def keep(event: Ping, ctx: Context) -> None:
        ctx.session.add(_Row(id=str(event.n)))

    bus = MemoryTransport()
    runtime = Runtime(App("tables", [pong]), transport=bus,
                      store=f"sqlite:///{tmp_path}/{{service}}.db",
                      settings=WorkerSettings(concurrency=1))  # fmt: skip
    # when it starts and handles a Ping
    async with runtime:
        await bus.publish([ping(6)])
        await wait_until_quiet(runtime)
    # then its table was there for the handler's row
    assert await bus.dead_letters() == []
    db = sqlite3.connect(tmp_path / "pong.db")
    try:
        assert db.execute("SELECT id FROM pings").fetchall() == [("6",)]
    finally:
        db.close()


async def test_a_service_with_tables_names_the_extra_it_needs_when_sqlalchemy_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a service with tables of its own, in a process where SQLAlchemy cannot be imported
    pong = Service("pong", tables=_Tables.metadata)

    @pong.on(Ping)
    async def keep(event: Ping, ctx: Context) -> None:
        pass

    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    monkeypatch.delitem(sys.modules, "choreograph.orm", raising=False)
    runtime = Runtime(App("tables", [pong]), transport=MemoryTransport(),
                      store=f"sqlite:///{tmp_path}/{{service}}.db",
                      settings=WorkerSettings(concurrency=1))  # fmt: skip
    # when it starts, then it says what needs which extra
    needs = "the tables of pong needs an extra: pip install 'choreograph[sqlalchemy]' ("
    with pytest.raises(ConfigurationError, match=f"^{re.escape(needs)}"):
        async with runtime:
            pass


# documents another transaction holds --------------------------------------------------------------


class _HeldTx:
    """A transaction of a store with per-document locks (as PostgreSQL's row locks): in a
    ``locks="raise"`` transaction, touching a document another transaction holds raises
    :class:`DocumentBusy`."""

    def __init__(self, tx: StoreTx, held: set[tuple[str, str]]) -> None:
        self._tx, self._held = tx, held

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        if (kind, key) in self._held:
            raise DocumentBusy((kind, key))
        return await self._tx.get(kind, key)


class _Locks:
    """Gives a running worker's SQLite store per-document locks held by the test: a transaction
    taking a lock first waits until the test releases it, as it would wait for another holder."""

    def __init__(self, store: Any, held: set[tuple[str, str]]) -> None:
        self.held = held
        self.firsts: list[list[tuple[str, str]]] = []
        self._released = asyncio.Event()
        self._transaction = store.transaction
        store.transaction = self.transaction

    def release(self, lock: tuple[str, str]) -> None:
        self.held.discard(lock)
        self._released.set()
        self._released = asyncio.Event()

    @contextlib.asynccontextmanager
    async def transaction(
        self, *, locks: str = "wait", lock_first: Sequence[tuple[str, str]] = ()
    ) -> AsyncIterator[Any]:
        if locks == "raise":
            self.firsts.append(list(lock_first))
        for lock in lock_first:
            while lock in self.held:
                await self._released.wait()
        async with self._transaction(locks=locks, lock_first=lock_first) as tx:
            yield _HeldTx(tx, self.held) if locks == "raise" else tx


async def test_a_message_finding_its_documents_busy_waits_for_them_without_holding_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given a service counting Pings per key, one of whose keys another transaction holds, and
    # then, once released, a second one
    caplog.set_level(logging.INFO, logger="choreograph")
    attempts: dict[int, list[int]] = {}
    pong = Service("pong")

    @pong.on(Ping)
    async def count(event: Ping, ctx: Context) -> None:
        attempts.setdefault(event.n, []).append(ctx.attempt)
        for kind in ("first", "second"):
            doc = await ctx.state.get(kind, ctx.correlation_id) or {"n": 0}
            await ctx.state.put(kind, ctx.correlation_id, {"n": doc["n"] + 1})

    bus = MemoryTransport()
    runtime = Runtime(App("held", [pong]), transport=bus, store="memory://",
                      settings=WorkerSettings(concurrency=1, lease=300))  # fmt: skip
    async with runtime:
        worker = runtime.workers["pong"]
        locks = _Locks(worker.store, {("first", "c1"), ("second", "c1")})

        async def counted(kind: str, key: str) -> int | None:
            async with runtime.unit_of_work("pong") as uow:
                doc = await uow.state.get(kind, key)
            return None if doc is None else int(doc["n"])

        # when a batch holds a Ping of that key between two others
        await bus.publish([ping(0), ping(1), ping(2)])

        # then the others commit while it waits for what is busy, first the one, then both
        await wait_for(lambda: len(locks.firsts) == 2)
        assert await counted("first", "c0") == await counted("first", "c2") == 1
        assert await counted("first", "c1") is None
        locks.release(("first", "c1"))
        await wait_for(lambda: len(locks.firsts) == 3)
        assert await counted("first", "c1") is None
        locks.release(("second", "c1"))
        await wait_until_quiet(runtime)
        assert locks.firsts == [[], [("first", "c1")], [("first", "c1"), ("second", "c1")]]
        # and it is handled once, as its first attempt: handing back spends none
        assert await counted("first", "c1") == await counted("second", "c1") == 1

    assert attempts[1][-1] == 1
    assert await bus.lag("pong") == 0
    assert await bus.dead_letters() == []
    assert worker_logs(caplog, logging.WARNING) == worker_logs(caplog, logging.ERROR) == []


class _Contended:
    """Gives a running worker's SQLite store a document another transaction takes again each
    time: every try of a ``locks="raise"`` transaction finds the next document of the handler's
    busy (the one after those it took first)."""

    def __init__(self, store: Any) -> None:
        self.tries = 0
        self.longest = 0  # the most locks a try was to take first
        self._transaction = store.transaction
        store.transaction = self.transaction

    @contextlib.asynccontextmanager
    async def transaction(
        self, *, locks: str = "wait", lock_first: Sequence[tuple[str, str]] = ()
    ) -> AsyncIterator[Any]:
        async with self._transaction(locks=locks, lock_first=lock_first) as tx:
            if locks != "raise":
                yield tx
                return
            self.tries += 1
            self.longest = max(self.longest, len(lock_first))
            yield _HeldTx(tx, {("doc", str(len(lock_first)))})


async def test_a_message_handed_back_again_and_again_is_left_for_its_lease_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given a service reading many documents, each try finding the next one busy
    caplog.set_level(logging.INFO, logger="choreograph")
    pong = Service("pong")

    @pong.on(Ping)
    async def read(event: Ping, ctx: Context) -> None:
        for n in range(HAND_BACKS + 1):
            await ctx.state.get("doc", str(n))

    bus = MemoryTransport()
    runtime = Runtime(App("contended", [pong]), transport=bus, store="memory://",
                      settings=WorkerSettings(concurrency=1, lease=300))  # fmt: skip
    async with runtime:
        contended = _Contended(runtime.workers["pong"].store)
        # when a Ping comes
        await bus.publish([ping(1)])
        await wait_for(lambda: worker_logs(caplog, logging.WARNING))
        # then the worker handed it back as many times as it may, then said it left it
        assert contended.tries == HAND_BACKS
        assert worker_logs(caplog, logging.WARNING) == [
            "pong: 1 messages still wait for busy documents; they come back after their lease"
        ]
        # unsettled: it is still leased, and comes back after its lease
        assert bus.busy("pong") == 1
        assert await bus.lag("pong") == 0


class _LosesOneCommit:
    """Gives a running worker's store a commit that fails once, when ``fail`` is set: the
    transaction is rolled back and its error raised, as a lost connection would. Counts the
    handling transactions asked for (``asked``), before they wait for the store."""

    def __init__(self, store: Any) -> None:
        self.fail = False
        self.asked = 0
        self._transaction = store.transaction
        store.transaction = self.transaction

    @contextlib.asynccontextmanager
    async def transaction(self, **options: Any) -> AsyncIterator[Any]:
        self.asked += options.get("locks") == "raise"
        async with self._transaction(**options) as tx:
            yield tx
            if self.fail:
                self.fail = False
                raise RuntimeError("the commit was lost")


async def test_events_another_lane_published_are_forgotten_after_a_failed_transaction() -> None:
    # given a service of two lanes on a store of one writer at a time, answering Ping 1 with a
    # Pong and handling Ping 0 once that Pong is out, each when told
    pong = Service("pong")
    entered, answer_now, pong_out = asyncio.Event(), asyncio.Event(), asyncio.Event()

    @pong.on(Ping, emits=[Pong])
    async def answer(event: Ping, ctx: Context) -> Pong | None:
        if event.n == 0:
            await pong_out.wait()
            return None
        entered.set()
        await answer_now.wait()
        return Pong(n=1)

    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    await bus.declare_group("reader", ["Pong"])
    runtime = Runtime(App("forgotten", [pong]), transport=bus, store="memory://", clock=clock,
                      settings=WorkerSettings(concurrency=2, batch_size=1, poll_interval=3600,
                                              housekeeping_interval=1000))  # fmt: skip
    async with runtime:
        worker = runtime.workers["pong"]
        commits = _LosesOneCommit(worker.store)
        # when a lane's transaction starts (Ping 0) while the other's (Ping 1) holds the store,
        await bus.publish([ping(1)])
        await asyncio.wait_for(entered.wait(), 30)
        await bus.publish([ping(0)])
        await wait_for(lambda: commits.asked == 2)
        # the other commits and publishes its Pong during it, and then it fails
        answer_now.set()
        await wait_for(lambda: bus.busy("reader") == 1)
        commits.fail = True
        pong_out.set()
        await wait_until_quiet(runtime)
        assert not commits.fail  # it did fail

        # then the Pong published is forgotten all the same: the relay has nothing to send again
        # once the worker's claim on it runs out
        later = clock.now() + FAST_PATH_CLAIM
        assert await worker.store.claim_outbox(later, 10, 1.0) == []


class _StoreLost:
    """Gives a running worker's store an outage while ``down`` is set: a transaction fails as
    it begins or commits, as with a lost connection."""

    def __init__(self, store: Any) -> None:
        self.down = False
        self._transaction = store.transaction
        store.transaction = self.transaction

    @contextlib.asynccontextmanager
    async def transaction(self, **options: Any) -> AsyncIterator[Any]:
        if self.down:
            raise RuntimeError("the store is gone")
        async with self._transaction(**options) as tx:
            yield tx
            if self.down:
                raise RuntimeError("the store is gone")


async def test_a_key_waits_for_its_event_whose_batch_did_not_commit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given an ordered service, on a virtual clock
    caplog.set_level(logging.INFO, logger="choreograph")
    handled: list[int] = []
    entered, go = asyncio.Event(), asyncio.Event()
    pong = Service("pong")

    @pong.on(Ping, ordered_by=CORRELATION)
    async def record(event: Ping, ctx: Context) -> None:
        handled.append(event.n)
        if event.n == 1 and ctx.attempt == 1:
            entered.set()
            await go.wait()

    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    settings = WorkerSettings(concurrency=1, batch_size=1, lease=60, poll_interval=3600,
                              housekeeping_interval=1000)  # fmt: skip
    runtime = Runtime(App("uncommitted", [pong]), transport=bus, clock=clock, settings=settings,
                      store="memory://")  # fmt: skip
    async with runtime:
        worker = runtime.workers["pong"]
        store = _StoreLost(worker.store)
        # when the store is lost while the first event of a key is handled: nothing commits
        await bus.publish([ping(1, key="k")])
        await asyncio.wait_for(entered.wait(), 30)
        await clock.advance(1)
        store.down = True
        go.set()
        await wait_for(lambda: worker_logs(caplog, logging.ERROR))
        store.down = False
        # and the next event of that key arrives before the first comes back after its lease
        await bus.publish([ping(2, key="k")])
        await wait_for(lambda: worker.inflight == 1 or len(handled) > 1)
        assert handled == [1]
        await clock.advance(settings.lease - 1)
        await wait_for(lambda: len(handled) == 3)

    # then the next event waited for the first: their key's order holds
    assert handled == [1, 1, 2]


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ({"concurrency": 0}, "concurrency and batch_size must be at least 1"),
        ({"batch_size": 0}, "concurrency and batch_size must be at least 1"),
        ({"lease": 0}, "lease and intervals must be positive seconds"),
        ({"poll_interval": 0}, "lease and intervals must be positive seconds"),
        ({"housekeeping_interval": 0}, "lease and intervals must be positive seconds"),
    ],
)
def test_worker_settings_out_of_range_are_refused_saying_which(
    setting: dict[str, float], says: str
) -> None:
    with pytest.raises(ConfigurationError, match=f"^{says}$"):
        WorkerSettings(**setting)  # type: ignore[arg-type]


def test_the_smallest_worker_settings_are_accepted() -> None:
    smallest = WorkerSettings(
        concurrency=1, batch_size=1, lease=0.5, poll_interval=0.5, housekeeping_interval=0.5
    )
    assert (smallest.concurrency, smallest.batch_size, smallest.lease) == (1, 1, 0.5)


# timers finding their documents busy ------------------------------------------------------------


def _deadline_app(reads: int) -> App:
    """A service expecting a Pong within 10 s of each Ping; its deadline reads ``reads``
    documents of its transaction."""
    pong = Service("pong")

    @pong.on(Ping)
    async def started(event: Ping, ctx: Context) -> None:
        pass

    @pong.deadline(starts_on=Ping, expect=[Pong], within=10, emits=[Done])
    async def late(expired: DeadlineExpired, ctx: Context) -> Done:
        for n in range(reads):
            await ctx.state.get("doc", str(n))
        return Done(n=0)

    return App("deadlines", [pong], terminal=[Done])


async def _timer_set(runtime: Runtime) -> None:
    store = runtime.workers["pong"].store
    for _ in range(3000):
        if await store.list_timers():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no timer was set")


async def test_a_timer_finding_a_document_busy_fires_once_it_is_released() -> None:
    # given a deadline set, whose document another transaction holds
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    await bus.declare_group("reader", ["Done"])
    runtime = Runtime(_deadline_app(1), transport=bus, store="memory://", clock=clock,
                      settings=VIRTUAL)  # fmt: skip
    async with runtime:
        await bus.publish([ping(1)])
        await _timer_set(runtime)
        locks = _Locks(runtime.workers["pong"].store, {("doc", "0")})
        # when it falls due
        await clock.advance(11)
        # then its transaction is rolled back, and the next one waits for the document first
        await wait_for(lambda: len(locks.firsts) == 2)
        assert locks.firsts == [[], [("doc", "0")]]
        assert bus.busy("reader") == 0
        # and once the document is released, the deadline fires
        locks.release(("doc", "0"))
        await wait_for(lambda: bus.busy("reader") == 1)
        assert await runtime.workers["pong"].store.list_timers() == []


async def test_a_timer_finding_a_new_document_busy_every_time_is_left_to_a_next_pass() -> None:
    # given a deadline reading many documents, each try finding the next one busy
    clock = VirtualClock()
    bus = MemoryTransport(clock=clock)
    runtime = Runtime(_deadline_app(HAND_BACKS + 2), transport=bus, store="memory://",
                      clock=clock, settings=VIRTUAL)  # fmt: skip
    async with runtime:
        await bus.publish([ping(1)])
        await _timer_set(runtime)
        contended = _Contended(runtime.workers["pong"].store)
        # when it falls due, then each pass tries again, waiting first for up to HAND_BACKS
        # documents found busy before, and then leaves the timer for a next pass
        await clock.advance(11)
        await wait_for(lambda: contended.longest == HAND_BACKS)
        assert len(await runtime.workers["pong"].store.list_timers()) == 1
