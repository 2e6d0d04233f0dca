"""The SQLite store opens a savepoint only before the first write inside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from choreograph.stores.sqlite import SqliteStore


class Boom(Exception):
    pass


async def test_a_savepoint_without_a_write_sends_no_statement_and_one_with_a_write_does(
    tmp_path: Path,
) -> None:
    store = SqliteStore.from_url(f"sqlite:///{tmp_path}/s.db", "svc")
    await store.open()
    statements: list[str] = []
    try:
        async with store.transaction() as tx:
            tx.connection.set_trace_callback(statements.append)
            async with tx.savepoint():
                await tx.get("drone", "d1")
                await tx.remember("e1", 1.0)
            assert not [s for s in statements if "SAVEPOINT" in s]
            with pytest.raises(Boom):
                async with tx.savepoint():
                    await tx.put("drone", "d1", {"v": 1})
                    await tx.remember("e2", 1.0)
                    raise Boom
            assert [s.split()[0] for s in statements if "sp" in s] == ["SAVEPOINT", "ROLLBACK",
                                                                       "RELEASE"]  # fmt: skip
            tx.connection.set_trace_callback(None)
        async with store.transaction() as tx:
            assert await tx.get("drone", "d1") is None
            assert await tx.seen_many(["e1", "e2"]) == {"e1"}
    finally:
        await store.close()
