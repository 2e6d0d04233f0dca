"""A message whose own store transaction fails takes its whole batch's transaction down: the
worker then handles the batch one message at a time, the others go through, and that message is
retried and finally dead-lettered as poison, with its reason. A store that does not answer at all
is another matter: nothing is settled, everything comes back."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

from choreograph import App, Context, Event, RetryPolicy, Runtime, Service, WorkerSettings
from choreograph.envelope import Envelope, encode
from choreograph.runtime.worker import POISON_ATTEMPTS
from choreograph.transport import DeadLetter, Message
from choreograph.transports.memory import MemoryTransport
from tests.support.quiet import wait_until_quiet

QUICK = RetryPolicy(max_attempts=5, immediate=1, base_delay=0.01, max_delay=0.02, jitter=0)


class Ping(Event):
    n: int


def build_app(handled: list[int]) -> App:
    pong = Service("pong", retry=QUICK)

    @pong.on(Ping)
    async def count(event: Ping, ctx: Context) -> None:
        handled.append(event.n)

    return App("isolation", [pong])


def ping(n: int, event_id: str | None = None) -> Message:
    envelope = Envelope(
        id=event_id or str(uuid.uuid4()), type="Ping", source="test", correlationid=f"c{n}",
        data={"n": n},
    )  # fmt: skip
    return Message(envelope.id, envelope.type, encode(envelope))


def refuse_in_inbox(path: Path) -> None:
    """The store itself refuses, at commit, the inbox row of any event id 'refused-...'."""
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TRIGGER refused BEFORE INSERT ON inbox WHEN NEW.event_id LIKE 'refused-%' "
        "BEGIN SELECT RAISE(ABORT, 'this store refuses the row'); END"
    )
    db.commit()
    db.close()


async def wait_for(check: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll ``check`` until it is truthy (the timeout only guards against a hang)."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - polls another task's state
            await asyncio.sleep(0.01)


async def test_a_message_failing_its_batch_is_isolated_retried_and_dead_lettered(
    tmp_path: Path,
) -> None:
    # given a service whose store refuses one event's inbox row, in one batch with ten others
    handled: list[int] = []
    bus = MemoryTransport()
    runtime = Runtime(
        build_app(handled),
        transport=bus,
        store=f"sqlite:///{tmp_path}/{{service}}.db",
        settings=WorkerSettings(concurrency=1, batch_size=50),
    )
    await bus.declare_group("pong", ["Ping"])
    poison = ping(99, event_id=f"refused-{uuid.uuid4()}")
    await bus.publish([ping(n) for n in range(5)] + [poison] + [ping(n) for n in range(5, 10)])

    # when the service runs (its store exists once it started)
    async with runtime:
        refuse_in_inbox(tmp_path / "pong.db")
        dead: list[DeadLetter] = []

        async def dead_lettered() -> None:
            dead[:] = await bus.dead_letters("pong")

        async with asyncio.timeout(60):
            while not dead:
                await dead_lettered()
                await asyncio.sleep(0.01)
        await wait_until_quiet(runtime)

    # then the ten others were handled (a batch that failed ran them again, one at a time), and
    # the poison dead-lettered alone, after its isolated attempts, saying why
    assert set(handled) - {99} == set(range(10))
    [letter] = dead
    assert letter.message.id == poison.id
    assert letter.failure.reason == "poison message"
    assert letter.failure.error_type == "IntegrityError"
    assert letter.failure.error.startswith("its store transaction fails on its own: ")
    assert "this store refuses the row" in letter.failure.error
    assert letter.attempts == POISON_ATTEMPTS
    assert await bus.lag("pong") == 0


async def test_a_store_that_does_not_answer_settles_nothing(tmp_path: Path) -> None:
    # given a running service, then its store file made unreadable under it
    handled: list[int] = []
    bus = MemoryTransport()
    runtime = Runtime(
        build_app(handled),
        transport=bus,
        store=f"sqlite:///{tmp_path}/{{service}}.db",
        settings=WorkerSettings(concurrency=1, batch_size=10, lease=300),
    )
    async with runtime:
        await bus.publish([ping(0)])
        await wait_for(lambda: handled == [0])
        await wait_until_quiet(runtime)
        worker = runtime.workers["pong"]
        await worker.store.close()  # every transaction now fails: the store does not answer

        # when two messages arrive while it does not answer
        await bus.publish([ping(1), ping(2)])
        await wait_for(lambda: bus.busy("pong") == 2 and not worker.inflight)

        # then neither was settled: nothing was dead-lettered, both still wait
        assert await bus.dead_letters() == []
        assert handled == [0]
        assert bus.busy("pong") == 2

        # and once the store answers again, both are handled
        await worker.store.open()
        await wait_for(lambda: sorted(handled) == [0, 1, 2])
        await wait_until_quiet(runtime)
    assert await bus.dead_letters() == []
