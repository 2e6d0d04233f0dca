"""``sqlite:///path.db`` and ``memory://`` service stores.

One SQLite file per service, in WAL mode. Calls run directly on the event loop thread: they take
microseconds, and a thread hop would cost more than the call. One transaction at a time per store
object (an asyncio lock); replicas in other processes serialise on SQLite's write lock. A single
writer needs no per-key locks: ``locks``, ``lock_first`` and ``skip_locked`` change nothing.

The service's own tables live in the same file (one transaction covers them and the inbox,
outbox and timers): a handler reaches them through ``ctx.connection`` (this store's
``sqlite3.Connection``) or ``ctx.session`` (SQLAlchemy, see :mod:`choreograph.orm`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any, Self
from urllib.parse import urlsplit

import orjson

from choreograph._files import private_file
from choreograph.errors import ConfigurationError
from choreograph.store import Locks, OutboxRow, Store, StoreTx, Timer

#: Most ids in one ``IN (...)`` list (SQLite allows 32,766 parameters since 3.32; far fewer keep
#: each statement cheap to prepare).
_IN_CHUNK = 500
#: Seconds SQLite itself waits for a lock before the store yields to the event loop.
_LOCK_POLL = 0.02

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    kind TEXT NOT NULL, key TEXT NOT NULL, doc BLOB NOT NULL, PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox (event_id TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS inbox_at ON inbox (at);
CREATE TABLE IF NOT EXISTS ended (
    correlation_id TEXT PRIMARY KEY, event_type TEXT NOT NULL, at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ended_at ON ended (at);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, topic TEXT NOT NULL,
    body BLOB NOT NULL, due_at REAL NOT NULL, leased_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (due_at);
CREATE INDEX IF NOT EXISTS outbox_id ON outbox (id);
CREATE TABLE IF NOT EXISTS timers (
    name TEXT NOT NULL, key TEXT NOT NULL, due_at REAL NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (name, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS timers_due ON timers (due_at);
CREATE INDEX IF NOT EXISTS timers_key ON timers (key);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


class StoreConnection(sqlite3.Connection):
    """The store's connection (``ctx.connection``)."""

    orm_engine: Any = None
    """The SQLAlchemy engine on this connection, once a session was asked for (choreograph.orm)."""
    orm_session: Any = None
    """The session a handling that succeeded left here, cleared, for the next (choreograph.orm)."""

    def unproxied(self) -> StoreConnection:
        return self


def _where(where: dict[str, Any] | None) -> tuple[str, list[Any]]:
    if not where:
        return "", []
    clauses, params = [], []
    for field, value in where.items():
        if value is None:
            clauses.append(f" AND json_extract(doc, '$.{field}') IS NULL")
            continue
        clauses.append(f" AND json_extract(doc, '$.{field}') = ?")
        params.append(int(value) if isinstance(value, bool) else value)
    return "".join(clauses), params


def _check_fields(where: dict[str, Any] | None) -> None:
    for field in where or ():
        if not field.replace("_", "").isalnum():
            raise ValueError(f"invalid field name {field!r}: use letters, digits and '_'")


class _SqliteTx(StoreTx):
    def __init__(self, db: sqlite3.Connection, indexed: set[str]) -> None:
        self._db = db
        self._savepoints = 0
        self._indexed = indexed
        # indexes made by this transaction: known to the store once it commits (a rollback
        # takes them away again)
        self.created: list[str] = []
        # Inbox and outbox rows are written in one statement each at commit (see flush);
        # a savepoint rolled back drops the rows added inside it.
        self._inbox: list[tuple[str, float]] = []
        self._inbox_ids: set[str] = set()
        self._outbox: list[tuple[str, str, bytes, float, float]] = []
        # Savepoints are lazy: SAVEPOINT is sent only before the first statement that writes
        # inside one (or when the connection is handed out), so a handling that writes no state
        # costs no statement for its savepoint. [name, opened]
        self._frames: list[list[Any]] = []

    def _writing(self) -> sqlite3.Connection:
        """The connection, with every savepoint open so far opened in SQLite."""
        for frame in self._frames:
            if not frame[1]:
                self._db.execute(f"SAVEPOINT {frame[0]}")
                frame[1] = True
        return self._db

    @property
    def connection(self) -> sqlite3.Connection:
        return self._writing()

    def flush(self) -> None:
        if self._inbox:
            self._db.executemany(
                "INSERT OR IGNORE INTO inbox (event_id, at) VALUES (?, ?)", self._inbox
            )
        if self._outbox:
            self._db.executemany(
                "INSERT INTO outbox (id, topic, body, due_at, leased_until) VALUES (?, ?, ?, ?, ?)",
                self._outbox,
            )

    def _index(self, where: dict[str, Any] | None) -> None:
        """Queries by a field get an expression index on it, made the first time it is asked."""
        _check_fields(where)
        for field in where or ():
            if field not in self._indexed and field not in self.created:
                self._writing().execute(
                    f"CREATE INDEX IF NOT EXISTS state_by_{field} "
                    f"ON state (kind, json_extract(doc, '$.{field}'))"
                )
                self.created.append(field)

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT doc FROM state WHERE kind = ? AND key = ?", (kind, key)
        ).fetchone()
        return None if row is None else orjson.loads(row[0])

    async def put(self, kind: str, key: str, doc: dict[str, Any]) -> None:
        self._writing().execute(
            "INSERT OR REPLACE INTO state (kind, key, doc) VALUES (?, ?, ?)",
            (kind, key, orjson.dumps(doc).decode()),
        )

    async def delete(self, kind: str, key: str) -> bool:
        cur = self._writing().execute("DELETE FROM state WHERE kind = ? AND key = ?", (kind, key))
        return cur.rowcount > 0

    async def find(
        self,
        kind: str,
        where: dict[str, Any] | None = None,
        limit: int = 100,
        *,
        skip_locked: bool = False,  # one writer at a time: nothing is ever held by another
    ) -> list[tuple[str, dict[str, Any]]]:
        self._index(where)
        clause, params = _where(where)
        # Without statistics the planner prefers the primary key; the field's index is far better.
        hint = f" INDEXED BY state_by_{next(iter(where))}" if where else ""
        rows = self._db.execute(
            f"SELECT key, doc FROM state{hint} WHERE kind = ?{clause} ORDER BY key LIMIT ?",
            (kind, *params, limit),
        ).fetchall()
        return [(key, orjson.loads(doc)) for key, doc in rows]

    async def count(self, kind: str, where: dict[str, Any] | None = None) -> int:
        self._index(where)
        clause, params = _where(where)
        hint = f" INDEXED BY state_by_{next(iter(where))}" if where else ""
        row = self._db.execute(
            f"SELECT count(*) FROM state{hint} WHERE kind = ?{clause}", (kind, *params)
        ).fetchone()
        return int(row[0])

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        self._savepoints += 1
        frame: list[Any] = [f"sp{self._savepoints}", False]
        marks = (len(self._inbox), len(self._outbox), len(self.created))
        self._frames.append(frame)
        try:
            yield
        except BaseException:
            self._frames.pop()
            if frame[1]:
                self._db.execute(f"ROLLBACK TO {frame[0]}")
                self._db.execute(f"RELEASE {frame[0]}")
            del self.created[marks[2] :]
            for event_id, _ in self._inbox[marks[0] :]:
                self._inbox_ids.discard(event_id)
            del self._inbox[marks[0] :]
            del self._outbox[marks[1] :]
            raise
        else:
            self._frames.pop()
            if frame[1]:
                self._db.execute(f"RELEASE {frame[0]}")

    async def seen(self, event_id: str) -> bool:
        if event_id in self._inbox_ids:
            return True
        row = self._db.execute("SELECT 1 FROM inbox WHERE event_id = ?", (event_id,)).fetchone()
        return row is not None

    async def seen_many(self, event_ids: Sequence[str]) -> set[str]:
        found = {event_id for event_id in event_ids if event_id in self._inbox_ids}
        rest = [event_id for event_id in event_ids if event_id not in found]
        for start in range(0, len(rest), _IN_CHUNK):
            chunk = rest[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT event_id FROM inbox WHERE event_id IN ({marks})", chunk
            ).fetchall()
            found.update(row[0] for row in rows)
        return found

    async def remember(self, event_id: str, at: float) -> None:
        self._inbox.append((event_id, at))
        self._inbox_ids.add(event_id)

    async def end_transaction(self, correlation_id: str, event_type: str, at: float) -> None:
        self._writing().execute(
            "INSERT OR IGNORE INTO ended (correlation_id, event_type, at) VALUES (?, ?, ?)",
            (correlation_id, event_type, at),
        )

    async def transaction_ended(self, correlation_id: str) -> str | None:
        row = self._db.execute(
            "SELECT event_type FROM ended WHERE correlation_id = ?", (correlation_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    async def ended_transactions(self, correlation_ids: Collection[str]) -> dict[str, str]:
        ids = list(correlation_ids)
        ended: dict[str, str] = {}
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT correlation_id, event_type FROM ended WHERE correlation_id IN ({marks})",
                chunk,
            ).fetchall()
            ended.update((str(row[0]), str(row[1])) for row in rows)
        return ended

    async def add_outbox(self, rows: Sequence[OutboxRow], claimed_until: float = 0.0) -> None:
        self._outbox.extend((r.id, r.topic, r.body, r.due_at, claimed_until) for r in rows)

    async def forget_outbox(self, ids: Sequence[str]) -> None:
        self._writing().executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    async def set_timer(self, timer: Timer) -> None:
        self._writing().execute(
            "INSERT OR REPLACE INTO timers (name, key, due_at, data) VALUES (?, ?, ?, ?)",
            (timer.name, timer.key, timer.due_at, orjson.dumps(timer.data)),
        )

    async def cancel_timers(self, key: str, names: Sequence[str] | None = None) -> int:
        if names is None:
            cur = self._writing().execute("DELETE FROM timers WHERE key = ?", (key,))
        else:
            cur = self._writing().executemany(
                "DELETE FROM timers WHERE key = ? AND name = ?", [(key, n) for n in names]
            )
        return cur.rowcount

    async def take_due_timers(self, now: float, limit: int) -> list[Timer]:
        rows = self._db.execute(
            "SELECT name, key, due_at, data FROM timers WHERE due_at <= ? ORDER BY due_at LIMIT ?",
            (now, limit),
        ).fetchall()
        self._writing().executemany(
            "DELETE FROM timers WHERE name = ? AND key = ?", [(r[0], r[1]) for r in rows]
        )
        return [Timer(r[0], r[1], r[2], orjson.loads(r[3])) for r in rows]


class SqliteStore(Store):
    def __init__(
        self, url: str, path: str, *, busy_timeout: float = 10.0, service: str = ""
    ) -> None:
        self.url = url
        self.path = path
        self.service = service
        """The service owning the file: the first to open it claims it; another is refused."""
        self._busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._indexed: set[str] = set()

    @classmethod
    def from_url(cls, url: str, service: str) -> Self:
        parts = urlsplit(url)
        if parts.scheme == "memory":
            return cls(url, ":memory:")
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ConfigurationError(f"store URL {url!r} names no file (sqlite:///path.db)")
        return cls(url, path, service=service)

    async def open(self) -> None:
        if self._db is not None:
            return
        if self.path != ":memory:":
            private_file(self.path)
        db = sqlite3.connect(
            # A short wait on the loop thread; longer waits for the write lock are async (_write).
            self.path,
            timeout=_LOCK_POLL,
            isolation_level=None,
            check_same_thread=False,
            factory=StoreConnection,
        )
        give_up = time.monotonic() + self._busy_timeout
        while True:  # replicas opening one new file at once contend for its first write
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
                owner = self._claim(db)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > give_up:
                    db.close()
                    raise
                await asyncio.sleep(_LOCK_POLL)
        if owner != self.service:
            db.close()
            raise ConfigurationError(
                f"the store {self.path} belongs to service {owner!r}; {self.service!r} cannot "
                "share it (one inbox for both: each would skip the other's events as "
                "duplicates). Give each service its own store: put {service} in the store URL, "
                "e.g. sqlite:///.choreograph/{service}.db"
            )
        self._db = db

    def _claim(self, db: sqlite3.Connection) -> str:
        """Record this store's service in a new file; return the service the file belongs to."""
        if not self.service or self.path == ":memory:":
            return self.service
        db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('service', ?)", (self.service,))
        row = db.execute("SELECT value FROM meta WHERE key = 'service'").fetchone()
        return str(row[0])

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"store {self.url} is not open")
        return self._db

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[sqlite3.Connection]:
        """One write transaction. Waiting for another process' write lock sleeps on the event
        loop (never blocks it), up to ``busy_timeout`` seconds."""
        async with self._lock:
            db = self._conn()
            give_up = time.monotonic() + self._busy_timeout
            pause = _LOCK_POLL
            while True:
                try:
                    db.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > give_up:
                        raise
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 0.2)
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            else:
                db.execute("COMMIT")

    @asynccontextmanager
    async def transaction(
        self, *, locks: Locks = "wait", lock_first: Sequence[tuple[str, str]] = ()
    ) -> AsyncIterator[StoreTx]:
        # One writer at a time: whatever a transaction reads stays true until it commits, so
        # there is nothing to lock per key and nothing is ever busy.
        async with self._write() as db:
            tx = _SqliteTx(db, self._indexed)
            yield tx
            tx.flush()
        self._indexed.update(tx.created)

    async def claim_outbox(self, now: float, limit: int, lease: float) -> list[OutboxRow]:
        async with self._write() as db:
            rows = db.execute(
                "UPDATE outbox SET leased_until = ? WHERE seq IN (SELECT seq FROM outbox "
                "WHERE due_at <= ? AND leased_until <= ? ORDER BY seq LIMIT ?) "
                "RETURNING id, topic, body, due_at",
                (now + lease, now, now, limit),
            ).fetchall()
        return [OutboxRow(r[0], r[1], r[2], r[3]) for r in rows]

    async def mark_sent(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        async with self._write() as db:
            db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    async def next_timer_due(self) -> float | None:
        row = self._conn().execute("SELECT min(due_at) FROM timers").fetchone()
        return None if row[0] is None else float(row[0])

    async def list_timers(self, key: str | None = None, limit: int = 100) -> list[Timer]:
        if key is None:
            rows = (
                self._conn()
                .execute(
                    "SELECT name, key, due_at, data FROM timers ORDER BY due_at LIMIT ?", (limit,)
                )
                .fetchall()
            )
        else:
            rows = (
                self._conn()
                .execute(
                    "SELECT name, key, due_at, data FROM timers WHERE key = ? ORDER BY due_at "
                    "LIMIT ?",
                    (key, limit),
                )
                .fetchall()
            )
        return [Timer(r[0], r[1], r[2], orjson.loads(r[3])) for r in rows]

    async def cancel_timer(self, name: str, key: str) -> bool:
        async with self._write() as db:
            cur = db.execute("DELETE FROM timers WHERE name = ? AND key = ?", (name, key))
        return cur.rowcount > 0

    async def prune_inbox(self, before: float) -> int:
        async with self._write() as db:
            forgotten = db.execute("DELETE FROM inbox WHERE at < ?", (before,)).rowcount
            forgotten += db.execute("DELETE FROM ended WHERE at < ?", (before,)).rowcount
        return forgotten
