"""A store connection keeps the session of a handling that succeeded for the next handling on it
(setting one up costs more than a statement), cleared: nothing a handling loaded, changed or added
reaches the next, and a failed handling's session is discarded with all it held."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

from sqlalchemy import select

from choreograph import App, Context, Event, PermanentFailure, Runtime, Service, WorkerSettings
from choreograph.envelope import decode
from choreograph.transport import Subscription
from choreograph.transports.memory import MemoryTransport
from tests.tables.ledger import Entry, create_tables, entries

SETTINGS = WorkerSettings(concurrency=1, batch_size=50, housekeeping_interval=0.02)


class Step(Event):
    n: int
    action: str
    """``load`` (read entry x through the session), ``change`` (set x to 2 with plain SQL) or
    ``fail`` (load x, change it and add an entry in the session, then fail before the flush)."""


class Seen(Event):
    n: int
    amount: int | None
    ghost: bool


def build(sessions: list[Any]) -> Service:
    notebook = Service("notebook")
    kept: list[Entry | None] = []

    @notebook.on(Step, emits=[Seen])
    async def step(event: Step, ctx: Context) -> Seen | None:
        sessions.append((event.n, ctx.session))
        if event.action == "change":
            if isinstance(ctx.connection, sqlite3.Connection):
                ctx.connection.execute("UPDATE entries SET amount = 2 WHERE id = 'x'")
            else:
                await ctx.connection.execute("UPDATE entries SET amount = 2 WHERE id = 'x'")
            return None
        entry = await ctx.session.get(Entry, "x")
        kept.append(entry)  # still referenced: it would stay in a session's identity map
        if event.action == "fail":
            assert entry is not None
            entry.amount = 999
            ctx.session.add(Entry(id="ghost", amount=0))
            raise PermanentFailure("refused after changing x and adding ghost in the session")
        ghost = await ctx.session.scalar(select(Entry.id).where(Entry.id == "ghost"))
        return Seen(n=event.n, amount=None if entry is None else entry.amount, ghost=bool(ghost))

    return notebook


async def seen(observer: Subscription, count: int) -> dict[int, Seen]:
    found: dict[int, Seen] = {}
    give_up = time.monotonic() + 30
    while len(found) < count:
        assert time.monotonic() < give_up, f"only {len(found)} of {count} Seen published"
        for delivery in await observer.receive(100, 0.1):
            event = Seen.parse_data(decode(delivery.message.body).data)
            found[event.n] = event
            await observer.ack([delivery])
    return found


async def dead_letter(bus: MemoryTransport) -> None:
    give_up = time.monotonic() + 30
    while not await bus.dead_letters("notebook"):
        assert time.monotonic() < give_up, "the failing step was not dead-lettered"
        await asyncio.sleep(0.02)


async def test_a_kept_session_carries_nothing_from_one_handling_to_the_next(
    store_url: str,
) -> None:
    sessions: list[Any] = []
    notebook = build(sessions)
    app = App("notebook", [notebook])
    bus = MemoryTransport()
    await bus.connect()
    await bus.declare_group("notebook", ["Step"])
    observer = await bus.subscribe("observer", ["Seen"])
    async with Runtime(app, transport=bus, store=store_url, settings=SETTINGS) as runtime:
        async with runtime.unit_of_work("notebook") as uow:
            await create_tables(uow)
            uow.session.add(Entry(id="x", amount=1))
        await runtime.remove_service("notebook")
        # given steps waiting, handled in order in one batch (one transaction, one connection):
        # x is loaded, changed behind the session's back, loaded again; a handling changes x and
        # adds an entry in the session, then fails; x is loaded again
        actions = ["load", "change", "load", "fail", "load"]
        for n, action in enumerate(actions):
            await runtime.publish(Step(n=n, action=action), source="t")
        await runtime.add_service(notebook)

        found = await seen(observer, 3)
        await dead_letter(bus)

        # then each load saw the database, not what an earlier handling loaded or changed
        assert (found[0].amount, found[2].amount, found[4].amount) == (1, 2, 2)
        assert not found[4].ghost
        async with runtime.unit_of_work("notebook") as uow:
            assert await entries(uow) == {"x": 2}
        # and the handlings that followed a success used the session it left, cleared
        by_step = dict(sessions)
        assert by_step[1] is by_step[0]
        assert by_step[2] is by_step[0]
        assert by_step[3] is by_step[0]
        # while the failed handling's session was discarded with its changes
        assert by_step[4] is not by_step[3]
