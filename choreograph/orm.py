"""SQLAlchemy sessions bound to a store transaction (``pip install 'choreograph[sqlalchemy]'``).

A handler's ``ctx.session`` (and a unit of work's ``uow.session``) is an ``AsyncSession`` whose
statements run on the store transaction's own connection, inside the message's savepoint: the
service's tables, its inbox, outbox and timers commit or roll back together. The runtime flushes
the session at the end of the handler (inside the savepoint, so a failed flush fails that
message alone) and clears it (see :func:`handling_session`); the store transaction commits later,
for the whole batch.

The session never controls the transaction: its engine's dialect turns the driver's commit,
rollback and close into no-ops, and :class:`TransactionSession` refuses ``commit``, ``rollback``
and ``close`` with a clear error (raise an exception to roll the message back).

PostgreSQL: the asyncpg dialect, on the store's asyncpg connection, without transaction control
of its own (statements run in the store's transaction; the store's lazily opened savepoints are
opened before each statement). Each statement is prepared once per connection, through asyncpg's
own statement cache, which lasts as long as the connection (SQLAlchemy's cache of prepared
statements would not: asyncpg invalidates the statements it handed out whenever the connection goes
back to the store's pool, after every transaction). A statement run again thus costs one round
trip, like a plain asyncpg query. Tables without a schema resolve through the connection's
``search_path``: the service's schema first.

SQLite: the store runs sqlite3 calls on the event loop thread (they take microseconds), in one
connection per store; an async driver (aiosqlite) would need a connection of its own in another
thread, which cannot join the store's transaction. So the session uses SQLAlchemy's pysqlite
dialect on the store's own connection, through an adapter whose coroutines run each call at
once: its statements run on the loop thread, exactly like the store's, inside its transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import MetaData, event, text
from sqlalchemy.connectors.asyncio import AsyncAdapt_dbapi_connection
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.postgresql.asyncpg import (
    AsyncAdapt_asyncpg_connection,
    PGDialect_asyncpg,
)
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool
from sqlalchemy.util.concurrency import await_

from choreograph.errors import ConfigurationError

if TYPE_CHECKING:
    from choreograph.store import StoreTx

_NOT_YOURS = (
    "the session belongs to the store transaction of this handling: choreograph flushes it and "
    "commits the transaction (with the inbox and outbox); raise an exception to roll this "
    "message's writes back"
)


class _RefusingSession(Session):
    """The session underneath: refuses to commit, whichever way it is asked (a ``begin()`` block
    ending, ``run_sync(lambda s: s.commit())``)."""


@event.listens_for(_RefusingSession, "before_commit")
def _refuse_commit(session: Session) -> None:
    raise ConfigurationError(f"committing the session is not allowed: {_NOT_YOURS}")


class TransactionSession(AsyncSession):
    """An ``AsyncSession`` on a store transaction: use it freely (add, execute, flush, query,
    ``begin_nested``), but never commit, roll back or close it yourself."""

    sync_session_class = _RefusingSession
    _home: Any = None
    """The store connection this session is kept on between handlings (``handling_session``)."""

    async def commit(self) -> None:
        raise ConfigurationError(f"session.commit() is not allowed: {_NOT_YOURS}")

    async def rollback(self) -> None:
        raise ConfigurationError(f"session.rollback() is not allowed: {_NOT_YOURS}")

    async def close(self) -> None:
        raise ConfigurationError(f"session.close() is not allowed: {_NOT_YOURS}")

    async def _flush_changes(self) -> None:
        """Flush, unless nothing is pending (a handler that only ran statements: no ORM flush)."""
        if self.new or self.dirty or self.deleted:
            await self.flush()

    async def _release(self) -> None:
        """Discard the session (no SQL: the dialect's rollback is a no-op)."""
        await super().close()

    async def _end_handling(self, *, succeeded: bool) -> None:
        """The handling that used this session ended: after a success, clear it and keep it on
        its connection for the next handling there; else (or if a handler left it inside a
        ``begin_nested`` block or with unflushed changes) discard it."""
        home = self._home
        if (
            succeeded
            and home is not None
            and home.orm_session is None
            and not self.in_nested_transaction()
            and not (self.new or self.dirty or self.deleted)
        ):
            if len(self.identity_map):  # (a handler that ran Core statements loaded nothing)
                self.expunge_all()  # nothing loaded here is seen by the next handling
            self.sync_session.autoflush = True
            self.info.clear()
            home.orm_session = self
            return
        await self._release()


class _NoTransactionControl:
    """Dialect methods that would end or close the store's transaction or connection: no-ops.
    The store begins, commits, rolls back and closes; SQLAlchemy only runs statements."""

    def do_begin(self, dbapi_connection: Any) -> None:
        pass

    def do_commit(self, dbapi_connection: Any) -> None:
        pass

    def do_rollback(self, dbapi_connection: Any) -> None:
        pass

    def do_close(self, dbapi_connection: Any) -> None:
        pass

    def do_terminate(self, dbapi_connection: Any) -> None:
        pass


class StorePostgresDialect(_NoTransactionControl, PGDialect_asyncpg):
    """asyncpg on a store connection. JSONB keeps the store's codec (Python values, orjson);
    JSON gets the same, so both column types read and write Python values."""

    supports_statement_cache = True

    async def setup_asyncpg_json_codec(self, conn: Any) -> None:
        await conn._connection.set_type_codec(
            "json",
            encoder=orjson.dumps,
            decoder=orjson.loads,
            schema="pg_catalog",
            format="binary",
        )

    async def setup_asyncpg_jsonb_codec(self, conn: Any) -> None:
        pass  # the store's own (see choreograph.stores.postgres)


class _StoreAsyncpgConnection(AsyncAdapt_asyncpg_connection):
    """SQLAlchemy's adapter of a store connection, preparing through the connection's own
    statement cache (``StoreConnection.prepare_cached``): a statement is parsed once for the
    connection's life, not once per transaction."""

    __slots__ = ()

    async def _prepare(self, operation: str, invalidate_timestamp: float) -> tuple[Any, Any]:
        # (after DDL, SQLAlchemy's invalidation reloads the schema state, which empties the cache)
        await self._check_type_cache_invalidation(invalidate_timestamp)  # type: ignore[no-untyped-call]
        connection: Any = self._connection  # a StoreConnection
        prepared = await connection.prepare_cached(operation)
        return prepared, prepared.get_attributes()


class StoreSqliteDialect(_NoTransactionControl, SQLiteDialect_pysqlite):
    """pysqlite on the store's connection, on the event loop thread (see the module's doc)."""

    supports_statement_cache = True
    is_async = True

    def set_isolation_level(self, dbapi_connection: Any, level: Any) -> None:
        # sqlite3 commits an open transaction when its isolation_level is set: never touch it
        pass

    def reset_isolation_level(self, dbapi_connection: Any) -> None:
        pass


def _identity(value: Any) -> Any:
    return value


def _engine_for(pooled: Any) -> AsyncEngine:
    """One engine per driver connection of a store (a store has a few, for its whole life),
    kept on the connection: its pool holds that connection only, and never closes it."""
    connection = pooled.unproxied()  # (a pool's proxy dies when the transaction ends)
    engine: AsyncEngine | None = connection.orm_engine
    if engine is None:
        registry.register("postgresql.choreograph_store", __name__, "StorePostgresDialect")
        registry.register("sqlite.choreograph_store", __name__, "StoreSqliteDialect")
        if isinstance(connection, sqlite3.Connection):
            engine = _sqlite_engine(connection)
        else:
            engine = _postgres_engine(connection)
        connection.orm_engine = engine
    return engine


class _LoopCursor:
    """A sqlite3 cursor with the coroutine methods of an asyncio driver's (each runs at once)."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def __aenter__(self) -> _LoopCursor:
        return self

    async def execute(self, operation: str, parameters: Any = ()) -> _LoopCursor:
        self._cursor.execute(operation, parameters)
        return self

    async def executemany(self, operation: str, parameters: Any) -> _LoopCursor:
        self._cursor.executemany(operation, parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(size or self._cursor.arraysize)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()


class _LoopConnection:
    """The store's sqlite3 connection as an asyncio driver's; never commits nor closes it."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def cursor(self) -> _LoopCursor:
        return _LoopCursor(self.db.cursor())

    async def commit(self) -> None:
        pass

    async def rollback(self) -> None:
        pass

    async def close(self) -> None:
        pass


class _AdaptedSqlite(AsyncAdapt_dbapi_connection):
    __slots__ = ()

    def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._connection.db.create_function(*args, **kwargs)


def _sqlite_engine(connection: sqlite3.Connection) -> AsyncEngine:
    return create_async_engine(
        "sqlite+choreograph_store://",
        creator=lambda: _AdaptedSqlite(sqlite3, _LoopConnection(connection)),  # type: ignore[arg-type]
        poolclass=StaticPool,
        pool_reset_on_return=None,
    )


def _postgres_engine(connection: Any) -> AsyncEngine:
    dbapi = StorePostgresDialect.import_dbapi()  # type: ignore[no-untyped-call]

    async def borrow() -> Any:
        return connection

    def adapt() -> Any:
        # No cache of SQLAlchemy's own (asyncpg invalidates the statements it handed out when the
        # connection goes back to the store's pool, after every transaction): the connection's
        # cache instead, through which each statement also opens the store's pending savepoints.
        return await_(
            _StoreAsyncpgConnection.create(dbapi, borrow(), prepared_statement_cache_size=0)
        )

    return create_async_engine(
        "postgresql+choreograph_store://",
        creator=adapt,
        poolclass=StaticPool,
        pool_reset_on_return=None,
        # no BEGIN or SAVEPOINT of its own: statements run in the store's transaction
        isolation_level="AUTOCOMMIT",
        # JSON values go to the driver as Python values (the store's codec encodes them)
        json_serializer=_identity,
    )


@asynccontextmanager
async def session_on(tx: StoreTx) -> AsyncIterator[TransactionSession]:
    """A session on ``tx`` outside any handling (operators' reads, scripts, tests), flushed at
    the end of the block and discarded; ``tx`` commits as usual."""
    session = open_session(tx)
    try:
        yield session
        await session.flush()
    finally:
        await session._release()


async def create_tables(tx: StoreTx, metadata: MetaData) -> None:
    """Create the tables of ``metadata`` that ``tx``'s database lacks, in ``tx`` (replicas
    starting together take turns on PostgreSQL; SQLite has a single writer)."""
    session = open_session(tx)
    try:
        connection = await session.connection()
        if connection.dialect.name == "postgresql":
            lock = (
                "SELECT pg_advisory_xact_lock(hashtext('choreograph tables ' || current_schema()))"
            )
            await connection.execute(text(lock))
        await connection.run_sync(metadata.create_all)
    finally:
        await session._release()


def open_session(tx: StoreTx) -> TransactionSession:
    """A session on ``tx``'s connection (see the module's doc), of its own."""
    return TransactionSession(_engine_for(tx.connection), expire_on_commit=False)


def handling_session(tx: StoreTx) -> TransactionSession:
    """The session of a handling (``ctx.session``) on ``tx``'s connection: the one the
    connection keeps from an earlier handling that succeeded (cleared: an empty identity map,
    nothing pending), else a new one. Setting up a session and its connection costs more CPU than
    a handler's statement; a store connection lives for many transactions, so each keeps one.
    End its use with ``_end_handling``."""
    connection = tx.connection.unproxied()
    session: TransactionSession | None = connection.orm_session
    if session is None:
        session = TransactionSession(_engine_for(connection), expire_on_commit=False)
        session._home = connection
    else:
        connection.orm_session = None  # in use: no one else gets it until it ends
    return session
