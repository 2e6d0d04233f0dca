"""Concurrent transactions on one service's store: two lanes of a process, or two replicas.

On PostgreSQL the two handles are two store objects (two pools), as two replicas have; memory://
and sqlite run the same checks on one store object, as two lanes of one process share it. Each
transaction sleeps while it holds what it read, so that the other one runs meanwhile.
"""

from __future__ import annotations

import asyncio
from itertools import cycle

from choreograph.store import OutboxRow, Store, Timer

NOW = 1_000_000.0
HOLD = 0.05  # seconds a transaction keeps what it read before writing and committing


async def test_concurrent_transactions_never_take_the_same_timer(
    replicas: tuple[Store, Store],
) -> None:
    a, b = replicas
    async with a.transaction() as tx:
        for i in range(20):
            await tx.set_timer(Timer("deadline:x", f"k{i:02}", NOW - i, {}))

    async def take(store: Store) -> list[Timer]:
        async with store.transaction() as tx:
            taken = await tx.take_due_timers(NOW, 8)
            await asyncio.sleep(HOLD)
            return taken

    results = await asyncio.gather(take(a), take(b), take(a), take(b))

    keys = [t.key for taken in results for t in taken]
    assert sorted(keys) == [f"k{i:02}" for i in range(20)]  # each timer exactly once
    for taken in results:
        assert [t.due_at for t in taken] == sorted(t.due_at for t in taken)
    assert await a.next_timer_due() is None


async def test_concurrent_relays_never_claim_the_same_row(replicas: tuple[Store, Store]) -> None:
    a, b = replicas
    async with a.transaction() as tx:
        await tx.add_outbox([OutboxRow(f"r{i:03}", "t", b"x") for i in range(200)])

    results = await asyncio.gather(*(s.claim_outbox(NOW, 60, 30) for s in (a, b, a, b)))

    claimed = [r.id for rows in results for r in rows]
    assert sorted(claimed) == [f"r{i:03}" for i in range(200)]


async def test_read_modify_write_loses_no_update(replicas: tuple[Store, Store]) -> None:
    async def increment(store: Store) -> None:
        async with store.transaction() as tx:
            doc = await tx.get("counter", "c") or {"n": 0}  # absent for the first ones
            await asyncio.sleep(HOLD / 5)
            await tx.put("counter", "c", {"n": doc["n"] + 1})

    await asyncio.gather(*(increment(s) for s, _ in zip(cycle(replicas), range(10), strict=False)))

    async with replicas[0].transaction() as tx:
        assert await tx.get("counter", "c") == {"n": 10}


async def test_find_then_put_never_reserves_one_document_twice(
    replicas: tuple[Store, Store],
) -> None:
    async with replicas[0].transaction() as tx:
        for i in range(5):
            await tx.put("drone", f"d{i}", {"status": "free"})
        await tx.put("drone", "d9", {"status": "broken"})

    async def reserve(store: Store, order: str) -> str | None:
        async with store.transaction() as tx:
            found = await tx.find("drone", {"status": "free"}, limit=1)
            if not found:
                return None
            key, doc = found[0]
            await asyncio.sleep(HOLD / 5)
            await tx.put("drone", key, {**doc, "status": "reserved", "order": order})
            return key

    orders = [f"o{i}" for i in range(8)]
    results = await asyncio.gather(
        *(reserve(s, o) for s, o in zip(cycle(replicas), orders, strict=False))
    )

    reserved = {key: order for key, order in zip(results, orders, strict=True) if key}
    assert sorted(key for key in results if key) == ["d0", "d1", "d2", "d3", "d4"]
    assert results.count(None) == 3
    async with replicas[0].transaction() as tx:
        for key, order in reserved.items():
            assert await tx.get("drone", key) == {"status": "reserved", "order": order}
        assert await tx.count("drone", {"status": "free"}) == 0


async def test_one_event_is_handled_once_when_two_replicas_get_it(
    replicas: tuple[Store, Store],
) -> None:
    async def handle(store: Store) -> str:
        async with store.transaction() as tx:
            if await tx.seen("e1"):
                return "duplicate"
            await asyncio.sleep(HOLD)
            await tx.remember("e1", NOW)
            return "handled"

    results = await asyncio.gather(*(handle(s) for s in replicas))

    assert sorted(results) == ["duplicate", "handled"]


async def test_an_event_whose_first_handling_rolled_back_is_handled_again(
    replicas: tuple[Store, Store],
) -> None:
    first, second = replicas
    remembered = asyncio.Event()

    async def handle_and_crash() -> None:
        async with first.transaction() as tx:
            assert not await tx.seen("e1")
            await tx.remember("e1", NOW)
            remembered.set()
            await asyncio.sleep(HOLD)
            raise RuntimeError("crash before the commit")

    async def handle_later() -> bool:
        await remembered.wait()
        async with second.transaction() as tx:
            seen = await tx.seen("e1")
            await tx.remember("e1", NOW)
            return seen

    crashed, seen = await asyncio.gather(handle_and_crash(), handle_later(), return_exceptions=True)

    assert isinstance(crashed, RuntimeError)
    assert seen is False
