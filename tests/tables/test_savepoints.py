"""Many handlings in one store transaction, each in its savepoint: the rows of one that fails go
with it, on the session's statements prepared earlier in the transaction too."""

from __future__ import annotations

import contextlib

import pytest
from sqlalchemy import select

from choreograph.orm import create_tables, open_session, session_on
from choreograph.store import store_from_url
from tests.tables.ledger import Base, Entry, insert_entry


class Handling:
    """What a handler sees of its transaction: ``connection`` and ``session``."""

    def __init__(self, tx: object) -> None:
        self.connection = tx.connection  # type: ignore[attr-defined]
        self.session = open_session(tx)  # type: ignore[arg-type]


@pytest.mark.parametrize("via", ["session", "connection"])
async def test_each_failed_savepoint_takes_its_rows_along(store_url: str, via: str) -> None:
    store = store_from_url(store_url, "ledger")
    await store.open()
    try:
        async with store.transaction() as tx:
            await create_tables(tx, Base.metadata)
        # given six handlings in one transaction, every other one failing after its write
        async with store.transaction() as tx:
            for n in range(6):
                with pytest.raises(RuntimeError) if n % 2 else contextlib.nullcontext():
                    async with tx.savepoint():
                        handling = Handling(tx)
                        try:
                            await insert_entry(handling, f"e{n}", n, via)
                            await handling.session.flush()
                            if n % 2:
                                raise RuntimeError("this handling fails")
                        finally:
                            await handling.session._release()
        # then only the rows of those that succeeded were committed
        async with store.transaction() as tx, session_on(tx) as session:
            assert sorted(await session.scalars(select(Entry.id))) == ["e0", "e2", "e4"]
    finally:
        await store.close()
