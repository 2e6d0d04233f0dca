"""On PostgreSQL a session's statement is prepared once per store connection, not once per
transaction, and a statement prepared in a savepoint that rolled back still serves."""

from __future__ import annotations

import contextlib

import pytest
from sqlalchemy import select

from choreograph.orm import create_tables, session_on
from choreograph.store import store_from_url
from tests.stores.conftest import STORE_URLS, drop_schemas
from tests.support.brokers import POSTGRES
from tests.tables.ledger import Base, Entry

pytestmark = pytest.mark.postgres

QUERY = select(Entry.amount).where(Entry.id == "e1")


async def test_a_statement_is_prepared_once_per_connection(namespace: str) -> None:
    POSTGRES.require()
    # one connection, so that every transaction runs on the same one
    store = store_from_url(STORE_URLS["postgres"].format(ns=namespace) + "&pool_size=1", "ledger")
    await store.open()
    try:
        async with store.transaction() as tx:
            await create_tables(tx, Base.metadata)
        async with store.transaction() as tx, session_on(tx) as session:
            session.add(Entry(id="e1", amount=5))
        names = []
        for n in range(3):
            async with store.transaction() as tx:
                # the first one in a savepoint that rolls back
                with pytest.raises(RuntimeError) if n == 0 else contextlib.nullcontext():
                    async with tx.savepoint(), session_on(tx) as session:
                        assert await session.scalar(QUERY) == 5
                        if n == 0:
                            raise RuntimeError("this handling fails")
                names.append(
                    await tx.connection.fetchval(
                        "SELECT name FROM pg_prepared_statements "
                        "WHERE statement LIKE 'SELECT %entries.amount%'"
                    )
                )
        assert names[0] is not None
        assert names == [names[0]] * 3
    finally:
        await store.close()
        await drop_schemas(namespace)
