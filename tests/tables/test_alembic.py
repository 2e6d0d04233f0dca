"""Alembic against a service's store database, as ``docs/guide/tables.md`` documents: a migration
run as a deployment step creates and changes the service's tables in its SQLite file or its
PostgreSQL schema, beside the store's own tables, and the service then runs on the migrated table.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import text

from choreograph import Runtime, WorkerSettings
from choreograph.transports.memory import MemoryTransport
from tests.stores.conftest import PG_URL
from tests.tables.ledger import Add, app, entries
from tests.tables.test_in_transaction import added

pytest.importorskip("alembic")

SETTINGS = WorkerSettings(concurrency=1, batch_size=50, housekeeping_interval=0.02)

#: The store's own tables, which are not in the service's models: autogenerate must skip them.
STORE_TABLES = ("state", "inbox", "ended", "outbox", "timers", "meta")

ENV_PY = '''
"""Alembic environment of the ledger service: its store's database, its schema first."""
import asyncio

from alembic import context
from sqlalchemy import engine_from_config, pool
from sqlalchemy.ext.asyncio import async_engine_from_config

from tests.tables.ledger import Base

STORE_TABLES = {store_tables!r}
config = context.config
schema = context.get_x_argument(as_dictionary=True).get("schema") or None


def include_object(obj, name, type_, reflected, compare_to):
    # the store's own tables are not the service's models: never propose to drop them
    return not (type_ == "table" and name in STORE_TABLES)


def migrate(connection):
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


async def migrate_async():
    options = dict(config.get_section(config.config_ini_section))
    # asyncpg takes the search path as a server setting (psycopg: ?options=-csearch_path%3D...)
    engine = async_engine_from_config(
        options, poolclass=pool.NullPool,
        connect_args={{"server_settings": {{"search_path": schema}}}},
    )
    async with engine.connect() as connection:
        await connection.run_sync(migrate)
    await engine.dispose()


if "+asyncpg" in config.get_main_option("sqlalchemy.url"):
    asyncio.run(migrate_async())
else:
    options = config.get_section(config.config_ini_section)
    engine = engine_from_config(options, poolclass=pool.NullPool)
    with engine.connect() as connection:
        migrate(connection)
'''

FIRST = '''
"""entries table"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade():
    op.create_table("entries", sa.Column("id", sa.String(64), primary_key=True))
'''

SECOND = '''
"""entries get an amount"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade():
    op.add_column("entries", sa.Column("amount", sa.Integer(), nullable=False, server_default="0"))
'''


def alembic_project(where: Path, url: str) -> Path:
    """An Alembic project (``alembic.ini``, ``env.py``, two revisions) migrating ``url``."""
    scripts = where / "migrations"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(ENV_PY.format(store_tables=STORE_TABLES))
    (scripts / "versions" / "0001_entries.py").write_text(textwrap.dedent(FIRST))
    (scripts / "versions" / "0002_amount.py").write_text(textwrap.dedent(SECOND))
    ini = where / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {scripts}\nsqlalchemy.url = {url}\n")
    return ini


async def alembic(ini: Path, *args: str) -> str:
    """Run the ``alembic`` command as a deployment step would; its output (fails the test when
    the command fails)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "alembic", "-c", str(ini), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        cwd=Path(__file__).parents[2],
    )  # fmt: skip
    async with asyncio.timeout(120):
        output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()
    return output.decode()


def alembic_url(store_url: str, tmp_path: Path) -> tuple[str, str]:
    """The SQLAlchemy URL of the store's database, and the service's schema ('' on SQLite)."""
    if store_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path}/s.db", ""
    schema = store_url.partition("schema=")[2].replace("{service}", "ledger")
    return PG_URL.replace("postgresql://", "postgresql+asyncpg://"), schema


async def test_the_service_runs_on_tables_alembic_created_and_changed(
    store_url: str, tmp_path: Path
) -> None:
    url, schema = alembic_url(store_url, tmp_path)
    ini = alembic_project(tmp_path, url)
    schema_args = ["-x", f"schema={schema}"] if schema else []

    # given the service's store, created by a first run of the service (without tables=)
    async with Runtime(app, transport=MemoryTransport(), store=store_url, settings=SETTINGS):
        pass

    # when Alembic upgrades its database to the head, one revision at a time
    await alembic(ini, *schema_args, "upgrade", "0001")
    await alembic(ini, *schema_args, "upgrade", "head")

    # then the migrated table is where the service looks, and the service writes to it
    bus = MemoryTransport()
    await bus.connect()
    observer = await bus.subscribe("observer", ["Added"])
    async with Runtime(app, transport=bus, store=store_url, settings=SETTINGS) as runtime:
        async with runtime.unit_of_work("ledger") as uow:
            columns = await uow.session.execute(text("SELECT amount FROM entries"))
            assert columns.all() == []
            if schema:  # the version table lives beside the service's tables, in its schema
                version = await uow.connection.fetchval(
                    f'SELECT version_num FROM "{schema}".alembic_version'
                )
            else:
                version = uow.connection.execute(
                    "SELECT version_num FROM alembic_version"
                ).fetchone()[0]
            assert version == "0002"
        await runtime.publish(Add(entry="e1", amount=7), source="test")
        assert [(e.entry, e.amount) for e in await added(observer, 1)] == [("e1", 7)]
        async with runtime.unit_of_work("ledger") as uow:
            assert await entries(uow) == {"e1": 7}

    # and autogenerate, skipping the store's own tables, finds the models and the database equal
    assert "No new upgrade operations detected" in await alembic(ini, *schema_args, "check")
