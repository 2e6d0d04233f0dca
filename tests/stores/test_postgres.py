"""What only the PostgreSQL store does: its URL, its schema per service and how that is created."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from choreograph.errors import ConfigurationError
from choreograph.store import Timer, store_from_url
from choreograph.stores.postgres import PostgresSettings, PostgresStore, schema_name
from tests.stores.conftest import PG_URL

# settings (no server needed) -------------------------------------------------------------------


def test_url_options_are_ours_or_passed_to_asyncpg() -> None:
    settings = PostgresSettings.from_url(
        "postgresql://u@db.local:5433/app?schema=Drones-1&pool_size=3&sslmode=disable",
        "svc",
    )
    assert settings == PostgresSettings(
        dsn="postgresql://u@db.local:5433/app?sslmode=disable",
        schema="drones_1",
        pool_size=3,
    )


@pytest.mark.parametrize(
    ("service", "schema"),
    [("orders", "orders"), ("drone-scheduler", "drone_scheduler"), ("1st.Line", "s_1st_line")],
)
def test_the_schema_defaults_to_the_sanitized_service_name(service: str, schema: str) -> None:
    store = store_from_url("postgres://127.0.0.1/test", service)
    assert isinstance(store, PostgresStore)
    assert store.settings.schema == schema
    assert schema_name(service) == schema


def test_the_service_placeholder_names_one_schema_per_service() -> None:
    store = store_from_url("postgresql://127.0.0.1/test?schema=prod_{service}", "billing")
    assert isinstance(store, PostgresStore)
    assert store.settings.schema == "prod_billing"


@pytest.mark.parametrize(
    "query",
    ["pool_size=many", "pool_size=0", f"schema={'x' * 64}"],
)
def test_bad_options_are_configuration_errors_without_the_password(query: str) -> None:
    with pytest.raises(ConfigurationError) as error:
        store_from_url(f"postgresql://u:s3cret@127.0.0.1/test?{query}", "svc")
    assert "s3cret" not in str(error.value)


async def test_a_store_that_is_not_open_says_so() -> None:
    store = store_from_url("postgresql://127.0.0.1/test", "svc")
    with pytest.raises(RuntimeError, match="not open"):
        await store.next_timer_due()


# with the server -------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_an_unknown_database_is_a_configuration_error(pg_namespace: str) -> None:
    store = store_from_url(
        PG_URL.rsplit("/", 1)[0] + f"/{pg_namespace}_missing_db?schema={{service}}", "svc"
    )
    with pytest.raises(ConfigurationError, match="does not exist"):
        await store.open()


@pytest.mark.postgres
async def test_each_service_has_its_own_schema(pg_namespace: str) -> None:
    url = f"{PG_URL}?schema={pg_namespace}_{{service}}"
    orders, billing = store_from_url(url, "orders"), store_from_url(url, "billing")
    await orders.open()
    await billing.open()
    try:
        async with orders.transaction() as tx:
            await tx.put("order", "o1", {})
            await tx.remember("e1", 0.0)
        async with billing.transaction() as tx:
            assert await tx.get("order", "o1") is None
            assert await tx.seen("e1") is False
    finally:
        await orders.close()
        await billing.close()


@pytest.mark.postgres
async def test_replicas_starting_together_create_the_schema_once(pg_namespace: str) -> None:
    url = f"{PG_URL}?schema={pg_namespace}_{{service}}"
    stores = [store_from_url(url, "svc") for _ in range(6)]

    await asyncio.gather(*(s.open() for s in stores))

    async with stores[0].transaction() as tx:
        await tx.put("k", "1", {})
    async with stores[-1].transaction() as tx:
        assert await tx.get("k", "1") == {}
    for store in stores:
        await store.close()


@pytest.mark.postgres
async def test_find_compares_lists_and_objects_for_equality(pg_namespace: str) -> None:
    store = store_from_url(f"{PG_URL}?schema={pg_namespace}_{{service}}", "s")
    await store.open()
    try:
        async with store.transaction() as tx:
            await tx.put("drone", "a", {"tags": ["x"], "at": {"lat": 1}})
            await tx.put("drone", "b", {"tags": ["x", "y"], "at": {"lat": 1, "lon": 2}})

            assert [k for k, _ in await tx.find("drone", {"tags": ["x"]})] == ["a"]
            assert [k for k, _ in await tx.find("drone", {"at": {"lat": 1}})] == ["a"]
            assert await tx.count("drone", {"tags": ["x", "y"], "at": {"lat": 1}}) == 0
    finally:
        await store.close()


@pytest.mark.postgres
async def test_a_replica_starting_does_not_wait_for_the_running_ones(pg_namespace: str) -> None:
    """Opening a store whose schema exists runs no DDL (which would wait for, or deadlock with,
    the transactions in flight)."""
    url = f"{PG_URL}?schema={pg_namespace}_{{service}}"
    running, starting = store_from_url(url, "svc"), store_from_url(url, "svc")
    await running.open()
    try:
        async with running.transaction() as tx:
            await tx.put("doc", "1", {})
            await tx.set_timer(Timer("t", "k", 0.0, {}))
            await tx.remember("e1", 0.0)
            await asyncio.wait_for(starting.open(), timeout=5)
            assert await starting.next_timer_due() is None  # not committed yet
    finally:
        await running.close()
        await starting.close()


def test_the_urls_in_the_docs_are_valid() -> None:
    docs = Path(__file__).parents[2] / "docs" / "stores.md"
    urls = re.findall(r"`(postgres(?:ql)?://[^`\s]+)`", docs.read_text())
    assert len(urls) >= 3
    for url in urls:
        assert isinstance(store_from_url(url, "drone-scheduler"), PostgresStore), url
