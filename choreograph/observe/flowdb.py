"""The flow recorder's database: every event, every handling, and one summary row per transaction.

``sqlite:///flows.db`` (default; relative path, or ``sqlite:////abs/flows.db``) or
``postgresql://user:pass@host/db`` (needs the ``postgres`` extra). Writes are idempotent: an event
or a report delivered twice is stored once, so the recorder can run at-least-once like any
consumer. The recorder writes; ``choreograph trace/stuck/stats`` read.
"""

from __future__ import annotations

import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from choreograph._files import private_file
from choreograph.errors import ConfigurationError
from choreograph.transport import redact

DEFAULT_DB_URL = "sqlite:///flows.db"

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS cg_events (
        id TEXT PRIMARY KEY, type TEXT NOT NULL, source TEXT NOT NULL,
        correlation_id TEXT NOT NULL, causation_id TEXT, time DOUBLE PRECISION NOT NULL,
        recorded_at DOUBLE PRECISION NOT NULL, traceparent TEXT, subject TEXT,
        data TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS cg_events_tx ON cg_events (correlation_id, time)",
    "CREATE INDEX IF NOT EXISTS cg_events_type_tx ON cg_events (type, correlation_id)",
    """CREATE TABLE IF NOT EXISTS cg_handlings (
        id TEXT PRIMARY KEY, event_id TEXT NOT NULL, event_type TEXT NOT NULL,
        correlation_id TEXT NOT NULL, service TEXT NOT NULL, handler TEXT NOT NULL,
        kind TEXT NOT NULL, attempt INTEGER NOT NULL, outcome TEXT NOT NULL,
        delay DOUBLE PRECISION, reason TEXT, error_type TEXT, error TEXT, note TEXT,
        emitted TEXT NOT NULL, started DOUBLE PRECISION NOT NULL,
        ended DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS cg_handlings_tx ON cg_handlings (correlation_id)",
    "CREATE INDEX IF NOT EXISTS cg_handlings_service ON cg_handlings (service, outcome)",
    "CREATE INDEX IF NOT EXISTS cg_handlings_time ON cg_handlings (ended)",
    """CREATE TABLE IF NOT EXISTS cg_transactions (
        correlation_id TEXT PRIMARY KEY, first_seen DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL, first_type TEXT NOT NULL, last_type TEXT NOT NULL,
        events INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0,
        retries INTEGER NOT NULL DEFAULT 0, dead_letters INTEGER NOT NULL DEFAULT 0,
        compensations INTEGER NOT NULL DEFAULT 0, terminal_type TEXT,
        ended_at DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS cg_transactions_open ON cg_transactions (ended_at, first_seen)",
    # One index per sortable column of the transaction list, with the tie-breaker, so that a
    # page of 50 in any order reads 50 index entries.
    *(
        f"CREATE INDEX IF NOT EXISTS cg_transactions_by_{column} "
        f"ON cg_transactions ({column}, correlation_id)"
        for column in ("first_seen", "last_seen", "events", "retries", "dead_letters")
    ),
    # Counts per minute, kept as the recorder writes, so that activity over days is a sum over
    # a few thousand rows: ``handling`` (a = service, b = outcome/step kind) and ``edge``
    # (a -> b: an event type handled by a service, or a service publishing an event type).
    """CREATE TABLE IF NOT EXISTS cg_rollup (
        kind TEXT NOT NULL, minute INTEGER NOT NULL, a TEXT NOT NULL, b TEXT NOT NULL,
        n INTEGER NOT NULL, PRIMARY KEY (kind, minute, a, b))""",
    # Short identifying fields of each event's data (``delivery_id = d-42``), so that a search by
    # a business key is an index lookup rather than a scan of every event's JSON.
    """CREATE TABLE IF NOT EXISTS cg_keys (
        value TEXT NOT NULL, name TEXT NOT NULL, correlation_id TEXT NOT NULL,
        PRIMARY KEY (value, name, correlation_id))""",
    "CREATE INDEX IF NOT EXISTS cg_keys_tx ON cg_keys (correlation_id)",
    # Every timer a service set, with its real due time, and what became of it.
    """CREATE TABLE IF NOT EXISTS cg_timers (
        id TEXT PRIMARY KEY, service TEXT NOT NULL, name TEXT NOT NULL, key TEXT NOT NULL,
        correlation_id TEXT NOT NULL, event_id TEXT NOT NULL, set_at DOUBLE PRECISION NOT NULL,
        due_at DOUBLE PRECISION NOT NULL, status TEXT NOT NULL, closed_at DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS cg_timers_tx ON cg_timers (correlation_id)",
    "CREATE INDEX IF NOT EXISTS cg_timers_key ON cg_timers (service, key, status)",
    """CREATE TABLE IF NOT EXISTS cg_heartbeats (
        replica TEXT NOT NULL, service TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
        started DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (replica, service))""",
    # What people did from the console (replay, discard), shown on the transaction's page.
    """CREATE TABLE IF NOT EXISTS cg_actions (
        id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, action TEXT NOT NULL,
        correlation_id TEXT NOT NULL, event_id TEXT NOT NULL, event_type TEXT NOT NULL,
        grp TEXT NOT NULL, edited INTEGER NOT NULL, result TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS cg_actions_tx ON cg_actions (correlation_id)",
    # What the recorder could not record, and why (it keeps consuming either way).
    """CREATE TABLE IF NOT EXISTS cg_rejects (
        id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, reason TEXT NOT NULL,
        detail TEXT NOT NULL)""",
]

#: Columns added after the first release; added in place to an older database on open.
MIGRATIONS = [
    ("cg_transactions", "late", "INTEGER NOT NULL DEFAULT 0"),
    ("cg_transactions", "outcome", "TEXT"),
    ("cg_handlings", "traceback", "TEXT"),
]
AFTER_MIGRATIONS = [
    "CREATE INDEX IF NOT EXISTS cg_transactions_by_outcome "
    "ON cg_transactions (outcome, first_seen, correlation_id)",
    "CREATE INDEX IF NOT EXISTS cg_transactions_late ON cg_transactions (late, first_seen)",
    # Replaced by the indexes above.
    "DROP INDEX IF EXISTS cg_events_type",
    "DROP INDEX IF EXISTS cg_transactions_started",
    "DROP INDEX IF EXISTS cg_transactions_last",
    "DROP INDEX IF EXISTS cg_transactions_outcome",
]

EVENT_COLUMNS = (
    "id",
    "type",
    "source",
    "correlation_id",
    "causation_id",
    "time",
    "recorded_at",
    "traceparent",
    "subject",
    "data",
)
HANDLING_COLUMNS = (
    "id",
    "event_id",
    "event_type",
    "correlation_id",
    "service",
    "handler",
    "kind",
    "attempt",
    "outcome",
    "delay",
    "reason",
    "error_type",
    "error",
    "note",
    "emitted",
    "started",
    "ended",
    "traceback",
)
TRANSACTION_COLUMNS = (
    "correlation_id",
    "first_seen",
    "last_seen",
    "first_type",
    "last_type",
    "events",
    "failures",
    "retries",
    "dead_letters",
    "compensations",
    "terminal_type",
    "ended_at",
    "late",
    "outcome",
)

# One upsert keeps the summary row current whichever arrives first, an event or a report.
_TOUCH = """
INSERT INTO cg_transactions (correlation_id, first_seen, last_seen, first_type, last_type,
    events, failures, retries, dead_letters, compensations, terminal_type, ended_at, late,
    outcome)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (correlation_id) DO UPDATE SET
    first_type = CASE WHEN excluded.first_seen < cg_transactions.first_seen
        THEN excluded.first_type ELSE cg_transactions.first_type END,
    first_seen = CASE WHEN excluded.first_seen < cg_transactions.first_seen
        THEN excluded.first_seen ELSE cg_transactions.first_seen END,
    last_type = CASE WHEN excluded.last_seen >= cg_transactions.last_seen
        THEN excluded.last_type ELSE cg_transactions.last_type END,
    last_seen = CASE WHEN excluded.last_seen > cg_transactions.last_seen
        THEN excluded.last_seen ELSE cg_transactions.last_seen END,
    events = cg_transactions.events + excluded.events,
    failures = cg_transactions.failures + excluded.failures,
    retries = cg_transactions.retries + excluded.retries,
    dead_letters = cg_transactions.dead_letters + excluded.dead_letters,
    compensations = cg_transactions.compensations + excluded.compensations,
    terminal_type = COALESCE(cg_transactions.terminal_type, excluded.terminal_type),
    ended_at = COALESCE(cg_transactions.ended_at, excluded.ended_at),
    late = cg_transactions.late + excluded.late,
    outcome = COALESCE(cg_transactions.outcome, excluded.outcome)
"""


class Tx(ABC):
    """One open database transaction. SQL uses ``?`` placeholders on every backend."""

    @abstractmethod
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; return the number of rows it changed."""

    @abstractmethod
    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run a query; return its rows as dicts."""

    @abstractmethod
    def savepoint(self) -> Any:
        """``async with tx.savepoint():`` — on error, undo only what ran inside it (the
        transaction stays usable), then re-raise."""


class FlowDb(ABC):
    """A connection to the recorder's database."""

    url: str
    dialect: str
    """``sqlite`` or ``postgresql``, for the few statements that differ."""

    @abstractmethod
    async def open(self) -> None:
        """Connect and create the tables if needed. Idempotent."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def transaction(self) -> Any:
        """``async with db.transaction() as tx:`` — commit on success, roll back on error."""

    def is_transient(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the database's trouble (locked, unreachable), not the data's."""
        return isinstance(exc, OSError)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        async with self.transaction() as tx:
            rows: list[dict[str, Any]] = await tx.fetch(sql, params)
            return rows

    async def __aenter__(self) -> FlowDb:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


# SQLite ------------------------------------------------------------------------------------------


class _SqliteTx(Tx):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, tuple(params)).rowcount

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self._conn.execute(sql, tuple(params))
        names = [d[0] for d in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        self._conn.execute("SAVEPOINT cg_item")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK TO cg_item")
            self._conn.execute("RELEASE cg_item")
            raise
        self._conn.execute("RELEASE cg_item")


class SqliteFlowDb(FlowDb):
    """One SQLite file in WAL mode: the recorder writes while the CLI reads. Statements are short
    and local, so they run on the event loop's thread."""

    dialect = "sqlite"

    def __init__(self, url: str, path: str) -> None:
        self.url = url
        self.path = path
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        if self._conn is not None:
            return
        if not Path(self.path).parent.is_dir():
            raise ConfigurationError(f"cannot open {self.path!r}: its directory does not exist")
        private_file(self.path)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA synchronous=NORMAL")
        for statement in SCHEMA:
            conn.execute(statement)
        for table, column, definition in MIGRATIONS:
            present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        for statement in AFTER_MIGRATIONS:
            conn.execute(statement)
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError | OSError)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        if self._conn is None:
            await self.open()
        assert self._conn is not None
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield _SqliteTx(self._conn)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")


# PostgreSQL --------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\?")


def _numbered(sql: str) -> str:
    counter = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class _PgTx(Tx):
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        status: str = await self._conn.execute(_numbered(sql), *params)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._conn.fetch(_numbered(sql), *params)]

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        async with self._conn.transaction():  # nested in the open one: a savepoint
            yield


class PostgresFlowDb(FlowDb):
    """PostgreSQL through asyncpg (a small pool), for a recorder shared by a whole deployment.

    ``?schema=name`` keeps the tables in their own schema (created if needed); other query
    options go to asyncpg.
    """

    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url.replace("postgresql+asyncpg://", "postgresql://", 1))
        query = parse_qsl(parts.query, keep_blank_values=True)
        schemas = [v for k, v in query if k == "schema"]
        self.schema = schemas[-1] if schemas else None
        if self.schema is not None and not _SCHEMA.match(self.schema):
            raise ConfigurationError(f"invalid schema name {self.schema!r} in {redact(url)}")
        rest = urlencode([(k, v) for k, v in query if k != "schema"])
        self._dsn = urlunsplit(parts._replace(query=rest))
        self._pool: Any = None

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            import asyncpg  # type: ignore[import-untyped]
        except ImportError as exc:
            raise ConfigurationError(
                f"a PostgreSQL recorder database needs: pip install 'choreograph[postgres]' ({exc})"
            ) from None
        settings = {"search_path": self.schema} if self.schema else {}
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=4, server_settings=settings
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise ConfigurationError(f"cannot open {redact(self.url)}: {exc}") from None
        # Two recorders starting at once must not race on CREATE TABLE.
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7261530)")
            if self.schema:
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            for statement in SCHEMA:
                await conn.execute(statement)
            for table, column, definition in MIGRATIONS:
                await conn.execute(
                    f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {definition}"
                )
            for statement in AFTER_MIGRATIONS:
                await conn.execute(statement)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def is_transient(self, exc: BaseException) -> bool:
        import asyncpg

        transient = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)
        return isinstance(exc, transient) or getattr(exc, "sqlstate", "")[:2] in ("53", "57")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        if self._pool is None:
            await self.open()
        async with self._pool.acquire() as conn, conn.transaction():
            yield _PgTx(conn)


_SCHEMA = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def flowdb_from_url(url: str | None = None) -> FlowDb:
    """The recorder database a URL names (not yet opened)."""
    url = url or DEFAULT_DB_URL
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if parts.netloc:
            raise ConfigurationError(
                f"sqlite URL {url!r} has a host; use sqlite:///rel.db or sqlite:////abs/path.db"
            )
        path = unquote(parts.path)[1:]
        if not path or path == ":memory:":
            raise ConfigurationError(f"sqlite URL {url!r} names no file (sqlite:///flows.db)")
        return SqliteFlowDb(url, path)
    if parts.scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        return PostgresFlowDb(url)
    raise ConfigurationError(
        f"unknown recorder database {redact(url)!r}; use sqlite:///flows.db or postgresql://..."
    )


def touch_params(
    correlation_id: str,
    at: float,
    event_type: str,
    *,
    events: int = 0,
    failures: int = 0,
    retries: int = 0,
    dead_letters: int = 0,
    compensations: int = 0,
    terminal_type: str | None = None,
    outcome: str | None = None,
    late: int = 0,
) -> tuple[Any, ...]:
    """Parameters of the summary upsert ``TOUCH`` for one new event or handling. ``outcome``
    (``completed`` or ``failed``) goes with ``terminal_type``."""
    ended = at if terminal_type else None
    return (
        correlation_id,
        at,
        at,
        event_type,
        event_type,
        events,
        failures,
        retries,
        dead_letters,
        compensations,
        terminal_type,
        ended,
        late,
        outcome,
    )


TOUCH = _TOUCH

#: Adds one to a per-minute count of ``cg_rollup``: params ``(kind, minute, a, b)``.
COUNT = (
    "INSERT INTO cg_rollup (kind, minute, a, b, n) VALUES (?, ?, ?, ?, 1) "
    "ON CONFLICT (kind, minute, a, b) DO UPDATE SET n = cg_rollup.n + 1"
)
