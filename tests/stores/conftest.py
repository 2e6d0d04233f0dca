"""Fixtures of the store contract suite: every store by URL, each test in its own database.

``store_url`` is parametrized over ``memory``, ``sqlite`` and ``postgres`` (marked ``postgres``:
it skips locally when the server is down and fails under ``CI=true``). Each PostgreSQL test gets
schemas of its own, dropped afterwards. Run one store with, e.g.::

    .venv/bin/python -m pytest tests/stores -k postgres -q
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from choreograph.store import Store, store_from_url
from tests.support.brokers import POSTGRES

#: The test database (trust auth); override to point the suite elsewhere.
PG_URL = os.environ.get("CHOREOGRAPH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
SERVICE = "svc"

STORE_URLS: dict[str, str] = {
    "memory": "memory://",
    "sqlite": "sqlite:///{tmp}/s.db",
    "postgres": PG_URL + "?schema={ns}_{{service}}",
}


def is_postgres(name: str) -> bool:
    return name == "postgres"


@pytest.fixture(
    params=[
        pytest.param(name, marks=[pytest.mark.postgres] if is_postgres(name) else [], id=name)
        for name in STORE_URLS
    ]
)
def store_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if is_postgres(name):
        POSTGRES.require()
    return name


@pytest.fixture
async def store_url(store_name: str, namespace: str, tmp_path: Path) -> AsyncIterator[str]:
    yield STORE_URLS[store_name].format(ns=namespace, tmp=tmp_path)
    if is_postgres(store_name):
        await drop_schemas(namespace)


async def drop_schemas(namespace: str) -> None:
    """Drop the schemas of a test: those named ``{namespace}_...``."""
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(PG_URL)
    try:
        names = await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)", f"{namespace}_"
        )
        for row in names:
            await conn.execute(f'DROP SCHEMA "{row["nspname"]}" CASCADE')
    finally:
        await conn.close()


StoreFactory = Callable[[], Awaitable[Store]]


@pytest.fixture
async def make_store(store_url: str) -> AsyncIterator[StoreFactory]:
    """Opened stores of the test's database; each call is a new store object (what a restart or
    another replica sees; for ``memory://`` a new, empty database)."""
    opened: list[Store] = []

    async def make() -> Store:
        store = store_from_url(store_url, SERVICE)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in reversed(opened):
        await store.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> Store:
    return await make_store()


@pytest.fixture
async def replicas(store_name: str, make_store: StoreFactory) -> tuple[Store, Store]:
    """Two handles on one service's database, as two replicas see it. PostgreSQL: two store
    objects (two pools). memory:// and sqlite: one object twice, as two lanes of one process
    share it (an event loop cannot host two SQLite writers: the second would block the first)."""
    first = await make_store()
    return (first, await make_store()) if is_postgres(store_name) else (first, first)


@pytest.fixture
async def pg_namespace(namespace: str) -> AsyncIterator[str]:
    """For PostgreSQL-only tests: a prefix for schema names (``{pg_namespace}_{service}``),
    whose schemas are dropped afterwards."""
    POSTGRES.require()
    yield namespace
    await drop_schemas(namespace)
