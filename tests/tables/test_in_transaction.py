"""A handler's own rows (``ctx.connection``, ``ctx.session``) commit or roll back with its
message: inbox, outbox and the message's savepoint included, on every store."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text

from choreograph import ConfigurationError, Runtime, WorkerSettings
from choreograph.envelope import decode
from choreograph.transport import Subscription
from choreograph.transports.memory import MemoryTransport
from tests.tables.ledger import Add, Added, Entry, app, create_tables, entries, ledger

SETTINGS = WorkerSettings(concurrency=1, batch_size=50, housekeeping_interval=0.02)


async def added(observer: Subscription, count: int) -> list[Added]:
    seen: list[Added] = []
    give_up = time.monotonic() + 30
    while len(seen) < count:
        assert time.monotonic() < give_up, f"only {len(seen)} of {count} Added published"
        for delivery in await observer.receive(100, 0.1):
            seen.append(Added.parse_data(decode(delivery.message.body).data))
            await observer.ack([delivery])
    return seen


async def dead_letters(bus: MemoryTransport, count: int) -> list[str]:
    give_up = time.monotonic() + 30
    while len(found := await bus.dead_letters("ledger")) < count:
        assert time.monotonic() < give_up, f"only {len(found)} of {count} dead letters"
        await asyncio.sleep(0.02)
    return [decode(d.message.body).data["entry"] for d in found]


@pytest.mark.parametrize("via", ["session", "connection"])
async def test_a_failed_message_takes_its_rows_along_and_the_others_keep_theirs(
    store_url: str, via: str
) -> None:
    bus = MemoryTransport()
    await bus.connect()
    await bus.declare_group("ledger", ["Add"])
    observer = await bus.subscribe("observer", ["Added"])
    async with Runtime(app, transport=bus, store=store_url, settings=SETTINGS) as runtime:
        async with runtime.unit_of_work("ledger") as uow:
            await create_tables(uow)
        await runtime.remove_service("ledger")
        # given three requests waiting, handled in one batch: the second fails after its write
        for n, fail in enumerate([False, True, False]):
            await runtime.publish(Add(entry=f"e{n}", amount=n, via=via, fail=fail), source="t")
        await runtime.add_service(ledger)

        # then the two others' rows and events are there, and the failed one left neither
        events = await added(observer, 2)
        assert sorted(e.entry for e in events) == ["e0", "e2"]
        assert await dead_letters(bus, 1) == ["e1"]
        async with runtime.unit_of_work("ledger") as uow:
            assert await entries(uow) == {"e0": 0, "e2": 2}


async def test_a_failed_flush_fails_that_message_alone(store_url: str) -> None:
    bus = MemoryTransport()
    await bus.connect()
    await bus.declare_group("ledger", ["Add"])
    observer = await bus.subscribe("observer", ["Added"])
    async with Runtime(app, transport=bus, store=store_url, settings=SETTINGS) as runtime:
        async with runtime.unit_of_work("ledger") as uow:
            await create_tables(uow)
            uow.session.add(Entry(id="taken", amount=-1))
        await runtime.remove_service("ledger")
        # given a request whose row collides with an existing one (the flush fails), between two
        for n, entry in enumerate(["a", "taken", "b"]):
            await runtime.publish(Add(entry=entry, amount=n), source="t")
        await runtime.add_service(ledger)

        # then the others went through; the colliding one is retried, never half-applied
        events = await added(observer, 2)
        assert sorted(e.entry for e in events) == ["a", "b"]
        async with runtime.unit_of_work("ledger") as uow:
            assert await entries(uow) == {"taken": -1, "a": 0, "b": 2}


async def test_a_unit_of_work_commits_rows_and_events_together_or_neither(store_url: str) -> None:
    bus = MemoryTransport()
    await bus.connect()
    observer = await bus.subscribe("observer", ["Added"])
    async with Runtime(app, transport=bus, store=store_url, settings=SETTINGS) as runtime:
        async with runtime.unit_of_work("ledger") as uow:
            await create_tables(uow)
        # when a request writes a row and emits, then fails before the end
        with pytest.raises(RuntimeError):
            async with runtime.unit_of_work("ledger", correlation_id="c1") as uow:
                uow.session.add(Entry(id="lost", amount=1))
                uow.emit(Added(entry="lost", amount=1))
                raise RuntimeError("the request failed")
        # and another one succeeds
        async with runtime.unit_of_work("ledger", correlation_id="c2") as uow:
            uow.session.add(Entry(id="kept", amount=2))
            uow.emit(Added(entry="kept", amount=2))

        # then only the second's row and event exist
        assert [e.entry for e in await added(observer, 1)] == ["kept"]
        async with runtime.unit_of_work("ledger") as uow:
            assert await entries(uow) == {"kept": 2}
        assert await observer.receive(10, 0.2) == []


async def test_the_session_cannot_be_committed_rolled_back_or_closed(store_url: str) -> None:
    async with Runtime(app, transport="memory://", store=store_url, settings=SETTINGS) as runtime:
        async with runtime.unit_of_work("ledger") as uow:
            await create_tables(uow)
            uow.session.add(Entry(id="x", amount=1))
            for refused in (uow.session.commit, uow.session.rollback, uow.session.close):
                with pytest.raises(ConfigurationError, match="not allowed"):
                    await refused()
            with pytest.raises(ConfigurationError, match="not allowed"):
                await uow.session.run_sync(lambda session: session.commit())
        async with runtime.unit_of_work("ledger") as uow:
            assert await entries(uow) == {"x": 1}  # the unit of work itself committed


async def test_connection_and_session_see_one_transaction(store_url: str) -> None:
    async with Runtime(app, transport="memory://", store=store_url, settings=SETTINGS) as runtime:
        async with runtime.unit_of_work("ledger") as uow:
            await create_tables(uow)
            await uow.state.put("doc", "k", {"v": 1})
            uow.session.add(Entry(id="s", amount=1))
            await uow.session.flush()
            # a row written by the session is seen by the driver connection, and the reverse
            counted = await uow.session.execute(text("SELECT count(*) FROM entries"))
            assert counted.scalar_one() == 1
            raw = uow.connection
            if hasattr(raw, "fetchval"):
                assert await raw.fetchval("SELECT count(*) FROM entries") == 1
            else:
                assert raw.execute("SELECT count(*) FROM entries").fetchone()[0] == 1
        async with runtime.unit_of_work("ledger") as uow:
            assert await uow.state.get("doc", "k") == {"v": 1}
            assert await entries(uow) == {"s": 1}
