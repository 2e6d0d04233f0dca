"""``postgresql://user@host:port/db?schema=NAME`` service stores (``postgres://`` too).

Each service owns one schema (default: its name, sanitized) holding the same five tables as the
SQLite store: ``state``, ``inbox``, ``ended``, ``outbox`` and ``timers``. Replicas of a service
share it.

Concurrency: every transaction first takes one lock per service (a transaction-scoped advisory
lock), so the batches of all lanes and replicas of a service run one after the other, exactly
like on the SQLite store: whatever a handler reads stays true until it commits (``find`` then
``put`` never reserves one document twice, a read-modify-write never loses an update, an event
handled by one replica is seen by the other) and no deadlock is possible. Work outside handler
transactions is shared between replicas without waiting: ``claim_outbox`` and
``take_due_timers`` skip rows another replica holds (``FOR UPDATE SKIP LOCKED``). See
``docs/stores.md`` for why documents are not locked one by one.

The service's own tables live in its schema too: every connection's ``search_path`` starts with
it, so a handler's unqualified ``INSERT INTO parcels`` on ``ctx.connection`` (or a SQLAlchemy model
without a schema on ``ctx.session``) reaches the service's table. See ``docs/guide/tables.md``.

URL options: ``schema``, ``pool_size`` (most connections of one store, default 5); all others
are passed to asyncpg (e.g. ``sslmode``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Self, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg  # type: ignore[import-untyped]
import orjson

from choreograph.errors import ConfigurationError
from choreograph.store import OutboxRow, Store, StoreTx, Timer
from choreograph.transport import redact

_MAX_IDENTIFIER = 63  # PostgreSQL truncates longer names silently; we refuse them instead


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    """What a ``postgresql://`` URL says beyond where the database is."""

    dsn: str = dataclasses.field(repr=False)  # may hold a password
    """The URL asyncpg connects with (our own options removed)."""
    schema: str
    pool_size: int = 5

    @classmethod
    def from_url(cls, url: str, service: str) -> PostgresSettings:
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ConfigurationError(f"not a PostgreSQL URL: {redact(url)!r}")
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        schema = schema_name(options.pop("schema", "") or service)
        try:
            pool_size = int(options.pop("pool_size", "5"))
        except ValueError:
            raise ConfigurationError(f"pool_size must be a number in {redact(url)!r}") from None
        if pool_size < 1:
            raise ConfigurationError(f"pool_size must be at least 1 in {redact(url)!r}")
        dsn = parts._replace(query=urlencode(options)).geturl()
        return cls(dsn, schema, pool_size)


def schema_name(name: str) -> str:
    """``name`` as a plain PostgreSQL identifier: lower case, ``[a-z0-9_]``, not starting with a
    digit (so ``drone-scheduler`` lives in schema ``drone_scheduler``)."""
    cleaned = re.sub(r"[^a-z0-9_]", "_", name.lower())
    if not cleaned or cleaned[0].isdigit():
        cleaned = f"s_{cleaned}"
    if len(cleaned) > _MAX_IDENTIFIER:
        raise ConfigurationError(
            f"schema name {cleaned!r} is longer than {_MAX_IDENTIFIER} characters"
        )
    return cleaned


def _lock_key(*parts: str) -> int:
    """A 64-bit advisory lock key. A collision only makes two unrelated things wait for each
    other, never share data."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# The schema, created under an advisory lock so that replicas starting together do not race on
# the catalog. Text columns sort bytewise (COLLATE "C"), as in SQLite, whatever the database's
# collation: find() returns documents "by key order" everywhere.
_SCHEMA_VERSION = "choreograph store, schema 2"  # 2: ended transactions
_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.state (
    kind TEXT COLLATE "C" NOT NULL, key TEXT COLLATE "C" NOT NULL, doc JSONB NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX IF NOT EXISTS state_doc ON {s}.state USING GIN (doc jsonb_path_ops);
CREATE TABLE IF NOT EXISTS {s}.inbox (
    event_id TEXT COLLATE "C" PRIMARY KEY, at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS inbox_at ON {s}.inbox (at);
CREATE TABLE IF NOT EXISTS {s}.ended (
    correlation_id TEXT COLLATE "C" PRIMARY KEY, event_type TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS ended_at ON {s}.ended (at);
CREATE TABLE IF NOT EXISTS {s}.outbox (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id TEXT COLLATE "C" NOT NULL,
    topic TEXT NOT NULL, body BYTEA NOT NULL, due_at DOUBLE PRECISION NOT NULL,
    leased_until DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_due ON {s}.outbox (due_at);
CREATE INDEX IF NOT EXISTS outbox_id ON {s}.outbox (id);
CREATE TABLE IF NOT EXISTS {s}.timers (
    name TEXT COLLATE "C" NOT NULL, key TEXT COLLATE "C" NOT NULL,
    due_at DOUBLE PRECISION NOT NULL, data JSONB NOT NULL, PRIMARY KEY (name, key)
);
CREATE INDEX IF NOT EXISTS timers_due ON {s}.timers (due_at);
CREATE INDEX IF NOT EXISTS timers_key ON {s}.timers (key);
COMMENT ON SCHEMA {s} IS '{version}';
"""


def _where(where: dict[str, Any] | None, params: list[Any]) -> str:
    """SQL matching documents whose top-level fields equal ``where``'s (a missing field equals
    ``None``, as in SQLite), appending its parameters to ``params``."""
    if not where:
        return ""
    clauses: list[str] = []
    scalars: dict[str, Any] = {}
    for field, value in where.items():
        if not field.replace("_", "").isalnum():
            raise ValueError(f"invalid field name {field!r}")
        # the name is only letters, digits and '_': safe inside a string literal
        if value is None:
            clauses.append(f" AND coalesce(doc -> '{field}', 'null') = 'null'")
        elif isinstance(value, dict | list):  # containment is not equality for these
            params.append(value)
            clauses.append(f" AND doc -> '{field}' = ${len(params)}::jsonb")
        else:
            scalars[field] = value
    if scalars:  # for scalars containment is equality, and it can use the GIN index
        params.append(scalars)
        clauses.insert(0, f" AND doc @> ${len(params)}::jsonb")
    return "".join(clauses)


def _timer(row: asyncpg.Record) -> Timer:
    return Timer(row["name"], row["key"], row["due_at"], row["data"])


def _count(status: str) -> int:
    """Rows affected, from a command status such as ``DELETE 3``."""
    return int(status.rsplit(" ", 1)[-1])


class StoreConnection(asyncpg.Connection):  # type: ignore[misc]
    """The store's connections. A handler may run its own statements on the one of its
    transaction (``ctx.connection``): before each, the savepoints the transaction has begun
    lazily are opened, so that the statement belongs to the message's savepoint."""

    _before: Callable[[], Awaitable[None]] | None = None
    orm_engine: Any = None
    """The SQLAlchemy engine on this connection, once a session was asked for (choreograph.orm)."""

    def unproxied(self) -> StoreConnection:
        """This connection itself, not the pool's proxy of it (which dies when it is released)."""
        return self

    def opening_savepoints(self, before: Callable[[], Awaitable[None]] | None) -> None:
        self._before = before

    async def before_statement(self) -> None:
        if self._before is not None:
            await self._before()


def _opening_savepoints(name: str) -> Any:
    method = getattr(asyncpg.Connection, name)

    @functools.wraps(method)
    async def run(self: StoreConnection, *args: Any, **kwargs: Any) -> Any:
        if self._before is not None:
            await self._before()
        return await method(self, *args, **kwargs)

    return run


for _name in (
    "execute", "executemany", "fetch", "fetchrow", "fetchval", "fetchmany", "prepare",
    "copy_from_table", "copy_from_query", "copy_to_table", "copy_records_to_table",
):  # fmt: skip
    setattr(StoreConnection, _name, _opening_savepoints(_name))


@dataclass(slots=True)
class _Frame:
    """A savepoint: its name, whether it exists in the database yet, and the buffers as they
    were when it began (restored when it fails; copying a few hundred references is cheaper
    than tracking changes)."""

    name: str
    inbox: list[tuple[str, float]]
    outbox: list[tuple[OutboxRow, float]]
    opened: bool = False


class _PostgresTx(StoreTx):
    """Inbox and outbox rows are kept in memory and written at the commit, in one statement each
    (a batch of messages costs two inserts, not two per message). Savepoints are opened lazily,
    before the first statement inside them, and released along with the next SAVEPOINT: a
    handling that only emits events and records its event id costs no round trip at all."""

    def __init__(self, conn: Any, store: PostgresStore) -> None:
        self._conn = conn  # the pool's proxy of a StoreConnection
        self._raw: StoreConnection = conn.unproxied()
        self._raw.opening_savepoints(self._sync)
        self._s = store.schema_sql
        self._inbox: list[tuple[str, float]] = []
        self._outbox: list[tuple[OutboxRow, float]] = []
        self._frames: list[_Frame] = []  # open savepoints, outermost first
        self._unreleased: str | None = None  # a savepoint left successfully, not yet released
        self._savepoints = 0

    # statements ------------------------------------------------------------------------------

    async def _sync(self) -> None:
        """Open the savepoints a statement is about to run in (releasing a finished one first,
        in the same round trip)."""
        pending = [frame for frame in self._frames if not frame.opened]
        if not pending:
            return
        sql = [f"RELEASE SAVEPOINT {self._unreleased}"] if self._unreleased else []
        sql += [f"SAVEPOINT {frame.name}" for frame in pending]
        self._unreleased = None
        # (the plain method: the connection's own would come back here first)
        await asyncpg.Connection.execute(self._raw, "; ".join(sql))
        for frame in pending:
            frame.opened = True

    async def _execute(self, sql: str, *args: Any) -> str:
        await self._sync()
        return cast(str, await self._conn.execute(sql, *args))

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        await self._sync()
        return cast("list[Any]", await self._conn.fetch(sql, *args))

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        await self._sync()
        return await self._conn.fetchval(sql, *args)

    async def flush(self) -> None:
        """Write the buffered inbox and outbox rows (called before the commit)."""
        if self._inbox:
            await self._conn.execute(
                f"INSERT INTO {self._s}.inbox (event_id, at) "
                "SELECT * FROM unnest($1::text[], $2::float8[]) ON CONFLICT DO NOTHING",
                [event_id for event_id, _ in self._inbox],
                [at for _, at in self._inbox],
            )
            self._inbox = []
        if self._outbox:
            await self._conn.execute(
                f"INSERT INTO {self._s}.outbox (id, topic, body, due_at, leased_until) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::float8[], "
                "$5::float8[])",
                [r.id for r, _ in self._outbox],
                [r.topic for r, _ in self._outbox],
                [r.body for r, _ in self._outbox],
                [r.due_at for r, _ in self._outbox],
                [claimed_until for _, claimed_until in self._outbox],
            )
            self._outbox = []

    @property
    def connection(self) -> Any:
        return self._conn

    # documents -------------------------------------------------------------------------------

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        doc = await self._fetchval(
            f"SELECT doc FROM {self._s}.state WHERE kind = $1 AND key = $2", kind, key
        )
        return cast("dict[str, Any] | None", doc)

    async def put(self, kind: str, key: str, doc: dict[str, Any]) -> None:
        await self._execute(
            f"INSERT INTO {self._s}.state (kind, key, doc) VALUES ($1, $2, $3) "
            "ON CONFLICT (kind, key) DO UPDATE SET doc = EXCLUDED.doc",
            kind,
            key,
            doc,
        )

    async def delete(self, kind: str, key: str) -> bool:
        status = await self._execute(
            f"DELETE FROM {self._s}.state WHERE kind = $1 AND key = $2", kind, key
        )
        return _count(status) > 0

    async def find(
        self, kind: str, where: dict[str, Any] | None = None, limit: int = 100
    ) -> list[tuple[str, dict[str, Any]]]:
        params: list[Any] = [kind, limit]
        clause = _where(where, params)
        rows = await self._fetch(
            f"SELECT key, doc FROM {self._s}.state WHERE kind = $1{clause} ORDER BY key LIMIT $2",
            *params,
        )
        return [(row["key"], row["doc"]) for row in rows]

    async def count(self, kind: str, where: dict[str, Any] | None = None) -> int:
        params: list[Any] = [kind]
        clause = _where(where, params)
        value = await self._fetchval(
            f"SELECT count(*) FROM {self._s}.state WHERE kind = $1{clause}", *params
        )
        return int(value)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        self._savepoints += 1
        frame = _Frame(f"sp{self._savepoints}", list(self._inbox), list(self._outbox))
        self._frames.append(frame)
        try:
            yield
        except BaseException as exc:
            self._frames.pop()
            self._inbox, self._outbox = frame.inbox, frame.outbox
            if frame.opened and isinstance(exc, Exception):
                # (a cancelled task skips this: the whole transaction is rolled back anyway)
                self._unreleased = None  # it was inside this savepoint: gone with it
                await self._conn.execute(
                    f"ROLLBACK TO SAVEPOINT {frame.name}; RELEASE SAVEPOINT {frame.name}"
                )
            raise
        else:
            self._frames.pop()
            if frame.opened:
                self._unreleased = frame.name  # releasing it releases any left inside it

    # inbox -----------------------------------------------------------------------------------

    async def seen(self, event_id: str) -> bool:
        if any(seen_id == event_id for seen_id, _ in self._inbox):
            return True
        return bool(
            await self._fetchval(
                f"SELECT EXISTS (SELECT 1 FROM {self._s}.inbox WHERE event_id = $1)", event_id
            )
        )

    async def remember(self, event_id: str, at: float) -> None:
        self._inbox.append((event_id, at))

    # ended transactions ----------------------------------------------------------------------

    async def end_transaction(self, correlation_id: str, event_type: str, at: float) -> None:
        await self._execute(
            f"INSERT INTO {self._s}.ended (correlation_id, event_type, at) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING",
            correlation_id,
            event_type,
            at,
        )

    async def transaction_ended(self, correlation_id: str) -> str | None:
        found = await self._fetchval(
            f"SELECT event_type FROM {self._s}.ended WHERE correlation_id = $1", correlation_id
        )
        return None if found is None else str(found)

    # outbox ----------------------------------------------------------------------------------

    async def add_outbox(self, rows: Sequence[OutboxRow], claimed_until: float = 0.0) -> None:
        self._outbox += [(row, claimed_until) for row in rows]

    async def forget_outbox(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        forgotten = set(ids)
        self._outbox = [(row, claim) for row, claim in self._outbox if row.id not in forgotten]
        await self._execute(f"DELETE FROM {self._s}.outbox WHERE id = ANY($1::text[])", list(ids))

    # timers ----------------------------------------------------------------------------------

    async def set_timer(self, timer: Timer) -> None:
        await self._execute(
            f"INSERT INTO {self._s}.timers (name, key, due_at, data) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (name, key) DO UPDATE SET due_at = EXCLUDED.due_at, data = EXCLUDED.data",
            timer.name,
            timer.key,
            timer.due_at,
            timer.data,
        )

    async def cancel_timers(self, key: str, names: Sequence[str] | None = None) -> int:
        if names is None:
            status = await self._execute(f"DELETE FROM {self._s}.timers WHERE key = $1", key)
        else:
            status = await self._execute(
                f"DELETE FROM {self._s}.timers WHERE key = $1 AND name = ANY($2::text[])",
                key,
                list(names),
            )
        return _count(status)

    async def take_due_timers(self, now: float, limit: int) -> list[Timer]:
        # Transactions of a service take turns, but a timer being cancelled right now (by
        # cancel_timer, outside them) is skipped rather than waited for.
        rows = await self._fetch(
            f"DELETE FROM {self._s}.timers WHERE (name, key) IN ("
            f"SELECT name, key FROM {self._s}.timers WHERE due_at <= $1 "
            "ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED) "
            "RETURNING name, key, due_at, data",
            now,
            limit,
        )
        return sorted((_timer(row) for row in rows), key=lambda t: t.due_at)


class PostgresStore(Store):
    """A service's store in its own PostgreSQL schema, through a small asyncpg pool."""

    def __init__(self, url: str, settings: PostgresSettings) -> None:
        self.url = url
        self.settings = settings
        self.schema_sql = f'"{settings.schema}"'
        self._service_lock = _lock_key(settings.schema, "service")
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
                await conn.execute(_SCHEMA.format(s=self.schema_sql, version=_SCHEMA_VERSION))

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _get_pool(self) -> asyncpg.Pool[Any]:
        if self._pool is None:
            raise RuntimeError(f"store {redact(self.url)} is not open")
        return self._pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[StoreTx]:
        # Lanes of this process queue here rather than each holding a connection while waiting
        # for the lock of the service, which serialises them with the other replicas.
        async with self._local, self._get_pool().acquire() as conn:
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", self._service_lock)
                    tx = _PostgresTx(conn, self)
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
