"""The PostgreSQL store: its pool, schema creation, transactions and housekeeping."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self

import asyncpg  # type: ignore[import-untyped]
import orjson

from choreograph.errors import ConfigurationError
from choreograph.store import Locks, OutboxRow, Store, StoreTx, Timer
from choreograph.stores.postgres._schema import (
    _MODES,
    _SCHEMA,
    _SCHEMA_VERSION,
    PostgresSettings,
    _lock_key,
)
from choreograph.stores.postgres._tx import StoreConnection, _count, _PostgresTx, _timer
from choreograph.transport import redact

_NOTHING = contextlib.nullcontext()


class PostgresStore(Store):
    """A service's store in its own PostgreSQL schema, through a small asyncpg pool."""

    def __init__(self, url: str, settings: PostgresSettings) -> None:
        self.url = url
        self.settings = settings
        self.schema_sql = f'"{settings.schema}"'
        self._service_lock = _lock_key(settings.schema, "service")
        self._seed = _lock_key(settings.schema, "keys")
        self._local = asyncio.Lock()
        self._pool: asyncpg.Pool[Any] | None = None

    @classmethod
    def from_url(cls, url: str, service: str) -> Self:
        return cls(url, PostgresSettings.from_url(url, service))

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self.settings.dsn,
                min_size=1,
                max_size=self.settings.pool_size,
                init=_init_connection,
                reset=_reset_connection,
                connection_class=StoreConnection,
                # the service's own tables: unqualified names resolve to its schema first
                server_settings={"search_path": f"{self.settings.schema}, public"},
            )
        except (
            asyncpg.InvalidCatalogNameError,
            asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InvalidPasswordError,
        ) as exc:
            raise ConfigurationError(f"store {redact(self.url)}: {exc}") from None
        try:
            async with pool.acquire() as conn:
                await self._create_schema(conn)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def _create_schema(self, conn: asyncpg.Connection[Any]) -> None:
        """Create the schema unless it is there: DDL on tables in use would wait for (and could
        deadlock with) the transactions of running replicas, even when it changes nothing."""
        version = "SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = $1"
        if await conn.fetchval(version, self.settings.schema) == _SCHEMA_VERSION:
            return
        async with conn.transaction():  # replicas starting together create it once
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", _lock_key(self.settings.schema, "ddl")
            )
            if await conn.fetchval(version, self.settings.schema) != _SCHEMA_VERSION:
                await conn.execute(
                    _SCHEMA.format(s=self.schema_sql, version=_SCHEMA_VERSION, seed=self._seed)
                )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _get_pool(self) -> asyncpg.Pool[Any]:
        if self._pool is None:
            raise RuntimeError(f"store {redact(self.url)} is not open")
        return self._pool

    @asynccontextmanager
    async def transaction(
        self, *, locks: Locks = "wait", lock_first: Sequence[tuple[str, str]] = ()
    ) -> AsyncIterator[StoreTx]:
        service_lock = self.settings.locking == "service"
        mode = 0 if service_lock else _MODES[locks]
        # With the lock of the service, lanes of this process queue here rather than each
        # holding a connection while waiting for it (it serialises them with other replicas).
        async with self._local if service_lock else _NOTHING, self._get_pool().acquire() as conn:
            try:
                async with conn.transaction():
                    if service_lock:
                        await conn.execute("SELECT pg_advisory_xact_lock($1)", self._service_lock)
                    elif lock_first and mode:
                        first = sorted(set(lock_first))
                        await conn.execute(
                            f"SELECT {self.schema_sql}.lock_keys($1::text[], $2::text[])",
                            [kind for kind, _ in first],
                            [key for _, key in first],
                        )
                    tx = _PostgresTx(conn, self.schema_sql, mode, claims=bool(mode))
                    yield tx
                    await tx.flush()
            finally:
                conn.opening_savepoints(None)

    async def claim_outbox(self, now: float, limit: int, lease: float) -> list[OutboxRow]:
        s = self.schema_sql
        rows = await self._get_pool().fetch(
            f"WITH claimed AS (UPDATE {s}.outbox SET leased_until = $1 WHERE seq IN ("
            f"SELECT seq FROM {s}.outbox WHERE due_at <= $2 AND leased_until <= $2 "
            "ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED) "
            "RETURNING seq, id, topic, body, due_at) "
            "SELECT id, topic, body, due_at FROM claimed ORDER BY seq",
            now + lease,
            now,
            limit,
        )
        return [OutboxRow(r["id"], r["topic"], r["body"], r["due_at"]) for r in rows]

    async def mark_sent(self, ids: Sequence[str]) -> None:
        if ids:
            await self._get_pool().execute(
                f"DELETE FROM {self.schema_sql}.outbox WHERE id = ANY($1::text[])", list(ids)
            )

    async def next_timer_due(self) -> float | None:
        due = await self._get_pool().fetchval(f"SELECT min(due_at) FROM {self.schema_sql}.timers")
        return None if due is None else float(due)

    async def list_timers(self, key: str | None = None, limit: int = 100) -> list[Timer]:
        s = self.schema_sql
        if key is None:
            rows = await self._get_pool().fetch(
                f"SELECT name, key, due_at, data FROM {s}.timers ORDER BY due_at LIMIT $1", limit
            )
        else:
            rows = await self._get_pool().fetch(
                f"SELECT name, key, due_at, data FROM {s}.timers WHERE key = $1 "
                "ORDER BY due_at LIMIT $2",
                key,
                limit,
            )
        return [_timer(row) for row in rows]

    async def cancel_timer(self, name: str, key: str) -> bool:
        status = await self._get_pool().execute(
            f"DELETE FROM {self.schema_sql}.timers WHERE name = $1 AND key = $2", name, key
        )
        return _count(status) > 0

    async def prune_inbox(self, before: float) -> int:
        forgotten = 0
        for table in ("inbox", "ended"):
            status = await self._get_pool().execute(
                f"DELETE FROM {self.schema_sql}.{table} WHERE at < $1", before
            )
            forgotten += _count(status)
        return forgotten


async def _init_connection(conn: asyncpg.Connection[Any]) -> None:
    # JSONB in binary form: a version byte (1), then the JSON text.
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: b"\x01" + orjson.dumps(value),
        decoder=lambda data: orjson.loads(data[1:]),
        format="binary",
    )


async def _reset_connection(conn: asyncpg.Connection[Any]) -> None:
    # The store keeps no session state (its locks are transaction-scoped, it never LISTENs nor
    # SETs), so asyncpg's reset query, a round trip on every release, is not needed. Only an
    # interrupted transaction must not be handed on.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")
