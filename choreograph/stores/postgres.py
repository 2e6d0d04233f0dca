"""``postgresql://user@host:port/db?schema=NAME`` service stores (``postgres://`` too).

Each service owns one schema (default: its name, sanitized) holding the same five tables as the
SQLite store: ``state``, ``inbox``, ``ended``, ``outbox`` and ``timers``. Replicas of a service
share it.

Concurrency (``locking=key``, the default): replicas and lanes of a service run their
transactions at the same time, each locking what it touches, per key, until it ends:

- a document (``get``, ``put``, ``delete``, each document ``find`` returns, matched again once
  locked), absent ones included (a read-modify-write of a new document loses no update);
- a correlation id's end (``transaction_ended``, ``end_transaction``): a late event and the
  terminal event of one transaction never run at the same time;
- the timers of a key (``set_timer``, ``cancel_timers``);
- an event id (``seen`` inserts it into the inbox at once: a replica handling the same event
  waits on that row and then sees it handled, or takes over if the first rolled back).

Locks are transaction-scoped advisory locks on a hash of ``(kind, key)`` (a collision only makes
two unrelated keys wait for each other), taken by small PL/pgSQL functions of the schema that
lock first and read afterwards, in the same round trip, so that a read always sees what the
previous holder committed. A worker's transactions use ``locks="raise"``: what is busy raises
:class:`~choreograph.store.DocumentBusy` instead of waiting, so they never wait while holding
anything and never deadlock; the worker handles that message again after the commit, in a
transaction that first waits for what was busy (``lock_first``, taken in one global order).
``find(..., skip_locked=True)`` reserves one of many without waiting at all. ``claim_outbox``
and ``take_due_timers`` skip rows another replica holds (``FOR UPDATE SKIP LOCKED``).

``locking=service`` keeps the former scheme: one advisory lock per service for every
transaction, so that all lanes and replicas of a service run one after the other (to compare).

The service's own tables live in its schema too: every connection's ``search_path`` starts with
it, so a handler's unqualified ``INSERT INTO parcels`` on ``ctx.connection`` (or a SQLAlchemy model
without a schema on ``ctx.session``) reaches the service's table. See ``docs/guide/tables.md``.
Statements a handler runs there take the locks it asks for (row locks wait; use ``SKIP LOCKED``
or ``NOWAIT`` where replicas compete, or lock the same rows in one order).

URL options: ``schema``, ``pool_size`` (most connections of one store, default 5), ``locking``
(``key`` or ``service``); all others are passed to asyncpg (e.g. ``sslmode``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, Self, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg  # type: ignore[import-untyped]
import orjson

from choreograph.errors import ConfigurationError
from choreograph.store import DocumentBusy, Locks, OutboxRow, Store, StoreTx, Timer
from choreograph.transport import redact

_MAX_IDENTIFIER = 63  # PostgreSQL truncates longer names silently; we refuse them instead


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    """What a ``postgresql://`` URL says beyond where the database is."""

    dsn: str = dataclasses.field(repr=False)  # may hold a password
    """The URL asyncpg connects with (our own options removed)."""
    schema: str
    pool_size: int = 5
    locking: Literal["key", "service"] = "key"

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
        locking = options.pop("locking", "key")
        if locking not in ("key", "service"):
            raise ConfigurationError(f"locking must be key or service in {redact(url)!r}")
        dsn = parts._replace(query=urlencode(options)).geturl()
        return cls(dsn, schema, pool_size, cast('Literal["key", "service"]', locking))


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
_SCHEMA_VERSION = "choreograph store, schema 3"  # 2: ended transactions; 3: per-key locks
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

-- Per-key locks. mode: 0 none, 1 wait, 2 try (busy: false), 3 try (find: skip the busy ones).
-- Each function locks, then reads in a statement of its own: in READ COMMITTED a volatile
-- function's statements each take a fresh snapshot, so a read sees what the previous holder of
-- the lock committed.
CREATE OR REPLACE FUNCTION {s}.lock_key(k TEXT, kk TEXT, mode INT) RETURNS BOOLEAN
LANGUAGE plpgsql AS $f$
DECLARE h BIGINT := hashtextextended(k || chr(31) || kk, {seed});
BEGIN
    IF mode = 1 THEN
        PERFORM pg_advisory_xact_lock(h);
    ELSIF mode >= 2 THEN
        RETURN pg_try_advisory_xact_lock(h);
    END IF;
    RETURN true;
END $f$;

CREATE OR REPLACE FUNCTION {s}.lock_keys(ks TEXT[], kks TEXT[]) RETURNS INT
LANGUAGE plpgsql AS $f$
BEGIN  -- in the order given (the caller sorts): whoever waits here waits in one global order
    FOR i IN 1 .. coalesce(array_length(ks, 1), 0) LOOP
        PERFORM {s}.lock_key(ks[i], kks[i], 1);
    END LOOP;
    RETURN coalesce(array_length(ks, 1), 0);
END $f$;

CREATE OR REPLACE FUNCTION {s}.get_doc(k TEXT, kk TEXT, mode INT, OUT ok BOOLEAN, OUT got JSONB)
LANGUAGE plpgsql AS $f$
BEGIN
    ok := {s}.lock_key(k, kk, mode);
    IF ok THEN
        SELECT s.doc INTO got FROM {s}.state AS s WHERE s.kind = k AND s.key = kk;
    END IF;
END $f$;

CREATE OR REPLACE FUNCTION {s}.put_doc(k TEXT, kk TEXT, d JSONB, mode INT) RETURNS BOOLEAN
LANGUAGE plpgsql AS $f$
BEGIN
    IF NOT {s}.lock_key(k, kk, mode) THEN
        RETURN false;
    END IF;
    INSERT INTO {s}.state (kind, key, doc) VALUES (k, kk, d)
        ON CONFLICT (kind, key) DO UPDATE SET doc = EXCLUDED.doc;
    RETURN true;
END $f$;

CREATE OR REPLACE FUNCTION {s}.delete_doc(k TEXT, kk TEXT, mode INT) RETURNS INT
LANGUAGE plpgsql AS $f$
DECLARE n INT;
BEGIN
    IF NOT {s}.lock_key(k, kk, mode) THEN
        RETURN -1;
    END IF;
    DELETE FROM {s}.state AS s WHERE s.kind = k AND s.key = kk;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $f$;

CREATE OR REPLACE FUNCTION {s}.matches(d JSONB, scalars JSONB, nulls TEXT[], exact JSONB)
RETURNS BOOLEAN LANGUAGE sql IMMUTABLE AS $f$
    SELECT d @> scalars
        AND NOT EXISTS (
            SELECT 1 FROM unnest(nulls) AS f WHERE coalesce(d -> f, 'null') <> 'null')
        AND NOT EXISTS (
            SELECT 1 FROM jsonb_each(exact) AS e WHERE (d -> e.key) IS DISTINCT FROM e.value)
$f$;

-- Matching documents in key order, each locked and matched again once locked. A busy one ends
-- the search (busy = true, for the caller to raise) unless mode 3 skips it.
CREATE OR REPLACE FUNCTION {s}.find_docs(
    k TEXT, scalars JSONB, nulls TEXT[], exact JSONB, lim INT, mode INT
) RETURNS TABLE (found_key TEXT, found_doc JSONB, busy BOOLEAN)
LANGUAGE plpgsql AS $f$
DECLARE
    candidate TEXT;
    taken INT := 0;
BEGIN
    IF lim <= 0 THEN
        RETURN;
    END IF;
    FOR candidate IN
        SELECT s.key FROM {s}.state AS s
        WHERE s.kind = k AND s.doc @> scalars AND {s}.matches(s.doc, scalars, nulls, exact)
        ORDER BY s.key
    LOOP
        IF NOT {s}.lock_key(k, candidate, mode) THEN
            CONTINUE WHEN mode = 3;
            found_key := candidate;
            found_doc := NULL;
            busy := true;
            RETURN NEXT;
            RETURN;
        END IF;
        SELECT s.doc INTO found_doc FROM {s}.state AS s
        WHERE s.kind = k AND s.key = candidate AND {s}.matches(s.doc, scalars, nulls, exact);
        IF FOUND THEN
            found_key := candidate;
            busy := false;
            RETURN NEXT;
            taken := taken + 1;
            EXIT WHEN taken >= lim;
        END IF;
    END LOOP;
END $f$;

-- The ends of many correlation ids, each locked (in the order given: the caller sorts); a busy
-- one ends the list (busy = true).
CREATE OR REPLACE FUNCTION {s}.ended_types(cs TEXT[], mode INT)
RETURNS TABLE (correlation_id TEXT, event_type TEXT, busy BOOLEAN)
LANGUAGE plpgsql AS $f$
DECLARE c TEXT;
BEGIN
    FOREACH c IN ARRAY cs LOOP
        IF NOT {s}.lock_key(chr(1) || 'ended', c, mode) THEN
            correlation_id := c;
            event_type := NULL;
            busy := true;
            RETURN NEXT;
            RETURN;
        END IF;
    END LOOP;
    -- after every lock is taken: a fresh snapshot sees what their previous holders committed
    RETURN QUERY SELECT e.correlation_id::TEXT, e.event_type, false
        FROM {s}.ended AS e WHERE e.correlation_id = ANY(cs);
END $f$;

CREATE OR REPLACE FUNCTION {s}.end_transaction(c TEXT, t TEXT, at_ DOUBLE PRECISION, mode INT)
RETURNS BOOLEAN LANGUAGE plpgsql AS $f$
BEGIN
    IF NOT {s}.lock_key(chr(1) || 'ended', c, mode) THEN
        RETURN false;
    END IF;
    INSERT INTO {s}.ended (correlation_id, event_type, at) VALUES (c, t, at_)
        ON CONFLICT DO NOTHING;
    RETURN true;
END $f$;

CREATE OR REPLACE FUNCTION {s}.set_timer(
    n TEXT, kk TEXT, due DOUBLE PRECISION, d JSONB, mode INT
) RETURNS BOOLEAN LANGUAGE plpgsql AS $f$
BEGIN
    IF NOT {s}.lock_key(chr(1) || 'timers', kk, mode) THEN
        RETURN false;
    END IF;
    INSERT INTO {s}.timers (name, key, due_at, data) VALUES (n, kk, due, d)
        ON CONFLICT (name, key) DO UPDATE SET due_at = EXCLUDED.due_at, data = EXCLUDED.data;
    RETURN true;
END $f$;

CREATE OR REPLACE FUNCTION {s}.cancel_timers(kk TEXT, names TEXT[], mode INT) RETURNS INT
LANGUAGE plpgsql AS $f$
DECLARE n INT;
BEGIN
    IF NOT {s}.lock_key(chr(1) || 'timers', kk, mode) THEN
        RETURN -1;
    END IF;
    DELETE FROM {s}.timers AS t WHERE t.key = kk AND (names IS NULL OR t.name = ANY(names));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $f$;

-- Due timers, earliest first, skipping those another transaction holds (the row, or the key's
-- timers in a handling that sets or cancels them).
CREATE OR REPLACE FUNCTION {s}.take_timers(now_ DOUBLE PRECISION, lim INT, mode INT)
RETURNS SETOF {s}.timers LANGUAGE plpgsql AS $f$
DECLARE t {s}.timers;
BEGIN
    FOR t IN
        SELECT * FROM {s}.timers AS x WHERE x.due_at <= now_ ORDER BY x.due_at LIMIT lim
        FOR UPDATE SKIP LOCKED
    LOOP
        CONTINUE WHEN NOT {s}.lock_key(
            chr(1) || 'timers', t.key, CASE mode WHEN 0 THEN 0 ELSE 3 END);
        DELETE FROM {s}.timers AS x WHERE x.name = t.name AND x.key = t.key;
        RETURN NEXT t;
    END LOOP;
END $f$;

COMMENT ON SCHEMA {s} IS '{version}';
"""


def _puts_sql(s: str, kinds: str, keys: str, docs: str) -> str:
    """Two common table expressions writing the buffered puts (``kinds``, ``keys`` and ``docs``,
    JSON text, are the placeholders of three arrays): documents into ``state``, and the ends of
    transactions (kind ``_ENDED``, doc ``[event_type, at]``) into ``ended``."""
    rows = f"unnest({kinds}::text[], {keys}::text[], {docs}::text[]) AS u(k, kk, d)"
    return (
        f"put_ended AS (INSERT INTO {s}.ended (correlation_id, event_type, at) "
        f"SELECT kk, d::jsonb ->> 0, (d::jsonb ->> 1)::float8 FROM {rows} "
        "WHERE k = chr(1) || 'ended' ON CONFLICT DO NOTHING), "
        f"put_docs AS (INSERT INTO {s}.state (kind, key, doc) SELECT k, kk, d::jsonb FROM {rows} "
        "WHERE k <> chr(1) || 'ended' ON CONFLICT (kind, key) DO UPDATE SET doc = EXCLUDED.doc)"
    )


#: Lock names of what is not a document (the functions above spell them the same way).
_ENDED = "\x01ended"
_WRITTEN = b"w"  # marks a buffered end already written (JSON never starts with it)
_TIMERS = "\x01timers"
_MODES: dict[Locks, int] = {"none": 0, "wait": 1, "raise": 2}
_NOTHING = contextlib.nullcontext()


@dataclass(frozen=True, slots=True)
class _Where:
    """``find``'s ``where`` as the ``matches`` function takes it: scalars (compared by
    containment, which can use the GIN index), fields that must be null or missing, and fields
    compared for equality (lists and objects, for which containment is not equality)."""

    scalars: dict[str, Any]
    nulls: list[str]
    exact: dict[str, Any]

    @classmethod
    def of(cls, where: dict[str, Any] | None) -> _Where:
        scalars: dict[str, Any] = {}
        nulls: list[str] = []
        exact: dict[str, Any] = {}
        for field, value in (where or {}).items():
            if not field.replace("_", "").isalnum():
                raise ValueError(f"invalid field name {field!r}")
            if value is None:
                nulls.append(field)
            elif isinstance(value, dict | list):
                exact[field] = value
            else:
                scalars[field] = value
        return cls(scalars, nulls, exact)


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
    claimed: list[str] = dataclasses.field(default_factory=list)
    """Event ids this savepoint inserted into the inbox (gone with it when it rolls back)."""
    held: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """Documents this savepoint locked (released when it rolls back)."""
    journal: int = 0
    """Where the journal of buffered puts stood when it began (undone back to it)."""


class _PostgresTx(StoreTx):
    """Inbox and outbox rows are kept in memory and written at the commit, in one statement
    (a batch of messages costs one statement, not two per message), with the puts of documents
    the transaction already holds and the ends of transactions it looked up. Savepoints are
    opened lazily, before the first statement inside them, and released along with the next
    SAVEPOINT: a handling that only emits events and records its event id costs no round trip
    of its own.

    ``mode`` is how keys are locked (see ``lock_key`` in the schema). With ``claims``, ``seen``
    inserts the event id into the inbox at once (the row is the lock of the event), and the
    commit keeps the remembered ones and deletes the others."""

    def __init__(self, conn: Any, store: PostgresStore, mode: int, *, claims: bool) -> None:
        self._conn = conn  # the pool's proxy of a StoreConnection
        self._raw: StoreConnection = conn.unproxied()
        self._raw.opening_savepoints(self._before_user_statement)
        self._s = store.schema_sql
        self._mode = mode
        self._claims = claims
        self._inbox: list[tuple[str, float]] = []
        self._claimed: set[str] = set()  # inbox rows this transaction inserted
        self._handled: set[str] = set()  # ids found in the inbox, committed by others
        self._outbox: list[tuple[OutboxRow, float]] = []
        # Documents this transaction holds the lock of, and puts of held documents not written
        # yet (serialized when put: later changes to the dict do not count, as in the database)
        # with the journal that undoes them when a savepoint rolls back.
        self._held: set[tuple[str, str]] = set()
        self._puts: dict[tuple[str, str], bytes] = {}
        self._ends: dict[str, str | None] = {}  # ends looked up (and locked) by this transaction
        self._journal: list[tuple[tuple[str, str], bytes | None]] = []
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
        return cast(str, await asyncpg.Connection.execute(self._raw, sql, *args))

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        await self._sync()
        return cast("list[Any]", await asyncpg.Connection.fetch(self._raw, sql, *args))

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        await self._sync()
        return await asyncpg.Connection.fetchrow(self._raw, sql, *args)

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        await self._sync()
        return await asyncpg.Connection.fetchval(self._raw, sql, *args)

    # Reads run where the transaction stands, without opening the handling's savepoint: a
    # handling that reads and then only puts what it read (buffered) costs no SAVEPOINT. The
    # locks they take outlive a rollback of the handling; the commit releases them (meanwhile
    # others are told the document is busy, which is harmless).

    async def _read(self, sql: str, *args: Any) -> list[Any]:
        return cast("list[Any]", await asyncpg.Connection.fetch(self._raw, sql, *args))

    async def _read_row(self, sql: str, *args: Any) -> Any:
        return await asyncpg.Connection.fetchrow(self._raw, sql, *args)

    async def _read_val(self, sql: str, *args: Any) -> Any:
        return await asyncpg.Connection.fetchval(self._raw, sql, *args)

    async def flush(self) -> None:
        """Write the inbox and outbox rows in one statement (called before the commit): keep
        the remembered event ids, delete the claimed ones that were not (a handling that failed
        or was handed back), insert the outbox rows."""
        remembered = dict(self._inbox)  # one row per id (a duplicate within the batch)
        forgotten = [event_id for event_id in self._claimed if event_id not in remembered]
        if not (remembered or forgotten or self._outbox or self._unwritten()):
            return
        s = self._s
        rows = [row for row, _ in self._outbox]
        puts = self._take_puts()
        await asyncpg.Connection.execute(
            self._raw,
            f"WITH forgotten AS (DELETE FROM {s}.inbox WHERE event_id = ANY($1::text[])), "
            f"kept AS (INSERT INTO {s}.inbox (event_id, at) "
            "SELECT * FROM unnest($2::text[], $3::float8[]) "
            # a claimed row already says when, to the second, unless the clock is another one
            "ON CONFLICT (event_id) DO UPDATE SET at = EXCLUDED.at "
            "WHERE abs(inbox.at - EXCLUDED.at) > 1), "
            f"{_puts_sql(s, '$9', '$10', '$11')} "
            f"INSERT INTO {s}.outbox (id, topic, body, due_at, leased_until) "
            "SELECT * FROM unnest($4::text[], $5::text[], $6::bytea[], $7::float8[], "
            "$8::float8[])",
            forgotten,
            list(remembered),
            list(remembered.values()),
            [r.id for r in rows],
            [r.topic for r in rows],
            [r.body for r in rows],
            [r.due_at for r in rows],
            [claimed_until for _, claimed_until in self._outbox],
            *puts,
        )
        self._inbox, self._outbox, self._claimed = [], [], set()

    # buffered puts -----------------------------------------------------------------------------

    def _hold(self, doc: tuple[str, str]) -> None:
        # (a savepoint rolled back forgets it: at worst its next put locks it again)
        if doc not in self._held:
            self._held.add(doc)
            if self._frames:
                self._frames[-1].held.append(doc)

    def _buffer(self, doc: tuple[str, str], data: bytes | None) -> None:
        """Set (``data``) or drop (None) the buffered put of ``doc``, journaled for savepoints."""
        if self._frames:
            self._journal.append((doc, self._puts.get(doc)))
        if data is None:
            self._puts.pop(doc, None)
        else:
            self._puts[doc] = data

    def _take_puts(self) -> tuple[list[str], list[str], list[str]]:
        """The buffered puts not written yet, as the three arrays of ``_puts_sql``. Documents
        leave the buffer; an end stays, marked written, so that it is still known."""
        taken = {doc: data for doc, data in self._puts.items() if not data.startswith(_WRITTEN)}
        if self._frames:
            self._journal += taken.items()
        for doc, data in taken.items():
            if doc[0] == _ENDED:
                self._puts[doc] = _WRITTEN + data
            else:
                del self._puts[doc]
        return [k for k, _ in taken], [kk for _, kk in taken], [d.decode() for d in taken.values()]

    def _unwritten(self) -> bool:
        return any(not data.startswith(_WRITTEN) for data in self._puts.values())

    async def _write_puts(self) -> None:
        """Write the buffered puts now (before a statement that reads documents)."""
        if self._unwritten():
            await self._sync()
            await asyncpg.Connection.execute(
                self._raw, f"WITH {_puts_sql(self._s, '$1', '$2', '$3')} SELECT 1",
                *self._take_puts(),
            )  # fmt: skip

    async def _before_user_statement(self) -> None:
        """A handler's own statement on ``ctx.connection`` sees its savepoint and its puts."""
        await self._sync()
        await self._write_puts()

    @property
    def connection(self) -> Any:
        return self._conn

    # documents -------------------------------------------------------------------------------

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        buffered = self._puts.get((kind, key))
        if buffered is not None:
            return cast("dict[str, Any]", orjson.loads(buffered))
        if not self._mode:
            doc = await self._read_val(
                f"SELECT doc FROM {self._s}.state WHERE kind = $1 AND key = $2", kind, key
            )
            return cast("dict[str, Any] | None", doc)
        row = await self._read_row(
            f"SELECT ok, got FROM {self._s}.get_doc($1, $2, $3)", kind, key, self._mode
        )
        if not row["ok"]:
            raise DocumentBusy((kind, key))
        self._hold((kind, key))
        return cast("dict[str, Any] | None", row["got"])

    async def put(self, kind: str, key: str, doc: dict[str, Any]) -> None:
        data = orjson.dumps(doc)
        if (not self._mode or (kind, key) in self._held) and b"\\u0000" not in data:
            # Held (or one writer at a time): nothing to lock, so the write waits for the next
            # statement that reads documents, or the commit. (A NUL, which PostgreSQL refuses
            # in JSON, is written at once: the handling fails in its own savepoint.)
            self._buffer((kind, key), data)
            return
        self._buffer((kind, key), None)
        if not self._mode:
            await self._execute(
                f"INSERT INTO {self._s}.state (kind, key, doc) VALUES ($1, $2, $3) "
                "ON CONFLICT (kind, key) DO UPDATE SET doc = EXCLUDED.doc",
                kind,
                key,
                doc,
            )
        elif await self._fetchval(
            f"SELECT {self._s}.put_doc($1, $2, $3, $4)", kind, key, doc, self._mode
        ):
            self._hold((kind, key))
        else:
            raise DocumentBusy((kind, key))

    async def delete(self, kind: str, key: str) -> bool:
        buffered = (kind, key) in self._puts
        self._buffer((kind, key), None)
        if not self._mode:
            status = await self._execute(
                f"DELETE FROM {self._s}.state WHERE kind = $1 AND key = $2", kind, key
            )
            return buffered or _count(status) > 0
        deleted = await self._fetchval(
            f"SELECT {self._s}.delete_doc($1, $2, $3)", kind, key, self._mode
        )
        if deleted < 0:
            raise DocumentBusy((kind, key))
        self._hold((kind, key))
        return buffered or bool(deleted)

    async def find(
        self,
        kind: str,
        where: dict[str, Any] | None = None,
        limit: int = 100,
        *,
        skip_locked: bool = False,
    ) -> list[tuple[str, dict[str, Any]]]:
        w = _Where.of(where)
        await self._write_puts()
        if not self._mode:
            rows = await self._read(
                f"SELECT key, doc FROM {self._s}.state WHERE kind = $1 AND doc @> $2 "
                f"AND {self._s}.matches(doc, $2, $3, $4) ORDER BY key LIMIT $5",
                kind,
                w.scalars,
                w.nulls,
                w.exact,
                limit,
            )
            return [(row["key"], row["doc"]) for row in rows]
        rows = await self._read(
            f"SELECT found_key, found_doc, busy FROM {self._s}.find_docs($1, $2, $3, $4, $5, $6)",
            kind,
            w.scalars,
            w.nulls,
            w.exact,
            limit,
            3 if skip_locked else self._mode,
        )
        if rows and rows[-1]["busy"]:
            raise DocumentBusy((kind, rows[-1]["found_key"]))
        for row in rows:
            self._hold((kind, row["found_key"]))
        return [(row["found_key"], row["found_doc"]) for row in rows]

    async def count(self, kind: str, where: dict[str, Any] | None = None) -> int:
        w = _Where.of(where)
        await self._write_puts()
        value = await self._read_val(
            f"SELECT count(*) FROM {self._s}.state WHERE kind = $1 AND doc @> $2 "
            f"AND {self._s}.matches(doc, $2, $3, $4)",
            kind,
            w.scalars,
            w.nulls,
            w.exact,
        )
        return int(value)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        self._savepoints += 1
        frame = _Frame(f"sp{self._savepoints}", list(self._inbox), list(self._outbox))
        frame.journal = len(self._journal)
        self._frames.append(frame)
        try:
            yield
        except BaseException as exc:
            self._frames.pop()
            self._inbox, self._outbox = frame.inbox, frame.outbox
            self._claimed.difference_update(frame.claimed)
            self._held.difference_update(frame.held)
            for doc, data in reversed(self._journal[frame.journal :]):
                if data is None:
                    self._puts.pop(doc, None)
                else:
                    self._puts[doc] = data
            del self._journal[frame.journal :]
            if not self._frames:
                self._journal = []
            if frame.opened and isinstance(exc, Exception | DocumentBusy):
                # (a cancelled task skips this: the whole transaction is rolled back anyway)
                self._unreleased = None  # it was inside this savepoint: gone with it
                await asyncpg.Connection.execute(
                    self._raw, f"ROLLBACK TO SAVEPOINT {frame.name}; RELEASE SAVEPOINT {frame.name}"
                )
            raise
        else:
            self._frames.pop()
            if self._frames:  # what it claimed and locked now goes with the savepoint around it
                self._frames[-1].claimed += frame.claimed
                self._frames[-1].held += frame.held
            else:
                self._journal = []
            if frame.opened:
                self._unreleased = frame.name  # releasing it releases any left inside it

    # inbox -----------------------------------------------------------------------------------

    async def seen_many(self, event_ids: Sequence[str]) -> set[str]:
        handled = {seen_id for seen_id, _ in self._inbox}.intersection(event_ids)
        if not self._claims:
            rows = await self._fetch(
                f"SELECT event_id FROM {self._s}.inbox WHERE event_id = ANY($1::text[])",
                [event_id for event_id in event_ids if event_id not in handled],
            )
            return handled | {row[0] for row in rows}
        # In one order for everyone: two batches sharing ids never wait for each other in a
        # cycle (the second waits at the first shared id for the first to end).
        ids = sorted(set(event_ids) - self._claimed - self._handled - handled)
        if ids:
            await self._sync()
            rows = await asyncpg.Connection.fetch(
                self._raw,
                f"INSERT INTO {self._s}.inbox (event_id, at) "
                "SELECT unnest($1::text[]), extract(epoch FROM clock_timestamp()) "
                "ON CONFLICT DO NOTHING RETURNING event_id",
                ids,
            )
            claimed = {row[0] for row in rows}
            self._claimed |= claimed
            if self._frames:
                self._frames[-1].claimed += claimed
            self._handled.update(event_id for event_id in ids if event_id not in claimed)
        return handled | self._handled.intersection(event_ids)

    async def seen(self, event_id: str) -> bool:
        if event_id in self._claimed:
            # ours: handled if remembered in this transaction (not if a handling of it failed)
            return any(seen_id == event_id for seen_id, _ in self._inbox)
        return event_id in await self.seen_many([event_id])

    async def remember(self, event_id: str, at: float) -> None:
        self._inbox.append((event_id, at))

    # ended transactions ----------------------------------------------------------------------

    def _known_end(self, correlation_id: str) -> tuple[bool, str | None]:
        """Whether this transaction knows (and holds) the end of ``correlation_id``, and it."""
        buffered = self._puts.get((_ENDED, correlation_id))
        if buffered is not None:
            return True, cast(str, orjson.loads(buffered.removeprefix(_WRITTEN))[0])
        if correlation_id in self._ends:
            return True, self._ends[correlation_id]
        return False, None

    async def end_transaction(self, correlation_id: str, event_type: str, at: float) -> None:
        known, ended = self._known_end(correlation_id)
        if known:  # looked up and locked: write it with the commit (the first ending is kept)
            if ended is None:
                self._buffer((_ENDED, correlation_id), orjson.dumps([event_type, at]))
            return
        if not await self._fetchval(
            f"SELECT {self._s}.end_transaction($1, $2, $3, $4)",
            correlation_id,
            event_type,
            at,
            self._mode,
        ):
            raise DocumentBusy((_ENDED, correlation_id))

    async def transaction_ended(self, correlation_id: str) -> str | None:
        return (await self.ended_transactions([correlation_id])).get(correlation_id)

    async def ended_transactions(self, correlation_ids: Collection[str]) -> dict[str, str]:
        known: dict[str, str | None] = {}
        unknown: list[str] = []
        for correlation_id in set(correlation_ids):
            is_known, ended = self._known_end(correlation_id)
            if is_known:
                known[correlation_id] = ended
            else:
                unknown.append(correlation_id)
        if unknown:
            # A read outside the message's savepoint (it need not open one): its locks, if the
            # handling is rolled back, are kept until the commit, which is harmless. Locked in
            # one order, so that waiting ("wait") is never part of a cycle with another batch.
            rows = await asyncpg.Connection.fetch(
                self._raw,
                f"SELECT correlation_id, event_type, busy FROM {self._s}.ended_types($1, $2)",
                sorted(unknown),
                self._mode,
            )
            if rows and rows[-1]["busy"]:
                raise DocumentBusy((_ENDED, rows[-1]["correlation_id"]))
            found = {row[0]: row[1] for row in rows}
            for correlation_id in unknown:
                known[correlation_id] = found.get(correlation_id)
            if not any(frame.opened for frame in self._frames):  # (else the lock may not last)
                self._ends.update((c, known[c]) for c in unknown)
        return {c: ended for c, ended in known.items() if ended is not None}

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
        if not await self._fetchval(
            f"SELECT {self._s}.set_timer($1, $2, $3, $4, $5)",
            timer.name,
            timer.key,
            timer.due_at,
            timer.data,
            self._mode,
        ):
            raise DocumentBusy((_TIMERS, timer.key))

    async def cancel_timers(self, key: str, names: Sequence[str] | None = None) -> int:
        cancelled = await self._fetchval(
            f"SELECT {self._s}.cancel_timers($1, $2, $3)",
            key,
            None if names is None else list(names),
            self._mode,
        )
        if cancelled < 0:
            raise DocumentBusy((_TIMERS, key))
        return int(cancelled)

    async def take_due_timers(self, now: float, limit: int) -> list[Timer]:
        # A timer being fired by another transaction, or whose key's timers another handling
        # is setting or cancelling, is skipped rather than waited for.
        rows = await self._fetch(
            f"SELECT name, key, due_at, data FROM {self._s}.take_timers($1, $2, $3)",
            now,
            limit,
            self._mode,
        )
        return sorted((_timer(row) for row in rows), key=lambda t: t.due_at)


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
                    tx = _PostgresTx(conn, self, mode, claims=bool(mode))
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
