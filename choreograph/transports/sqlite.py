"""``sqlite:///path.db`` — the embedded, durable bus, and the default transport.

Every process on one machine that opens the same file shares one bus: services in their own
processes, and replicas of one service competing for its messages. The file is in WAL mode, so
readers never block the writer; writers take turns on SQLite's single write lock, in short
``BEGIN IMMEDIATE`` transactions.

How it works
    ``publish`` fans a message out, in the same transaction, into one ``queue`` row per group bound
    to its topic (``bindings``), so a group declared later never sees it. A member claims rows of
    its group with ``UPDATE … RETURNING``: a claim sets ``available_at`` to the end of the lease and
    counts one more ``attempt``, so a row whose lease ran out (its holder died or is too slow) is
    simply available again and the next claim redelivers it with ``attempt`` + 1. ``ack`` deletes
    the row; ``retry`` moves ``available_at`` ``delay`` seconds ahead; ``dead_letter`` copies the
    row to ``dead_letters`` and deletes it, in one transaction. A settlement names the claim it
    settles (row id and attempt), so a member whose lease ran out and whose message was claimed by
    another member cannot settle that other member's delivery.

    Calls run on the event-loop thread, without a thread hop: they take microseconds. An idle
    ``receive`` polls ``PRAGMA data_version`` (which changes when another connection commits) and
    runs a query only when something changed or a retry or lease comes due. The wait between polls
    starts at ``min_poll_interval`` after the member received something and doubles up to
    ``poll_interval`` while it receives nothing; publishes through the same transport object wake
    its members at once, and publishes from other processes ring its doorbell
    (:mod:`choreograph.transports._doorbell`), which wakes them at once too.

Time is the wall clock (``time.time()``), shared by every process on the machine.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl, unquote, urlsplit

from choreograph._files import private_file
from choreograph.errors import ConfigurationError, PayloadTooLarge, TransportError
from choreograph.transport import (
    DeadLetter,
    Delivery,
    Failure,
    Message,
    Subscription,
    Transport,
    TransportSettings,
    check_group,
    oversized,
    redact,
    split_oversized,
)
from choreograph.transports._doorbell import Doorbell

_SYNCHRONOUS = ("normal", "full")


@dataclass(frozen=True)
class SqliteSettings(TransportSettings):
    """Settings of ``sqlite:///path.db?option=value&…``.

    The path comes from the URL: ``sqlite:///relative/bus.db`` (relative to the working directory)
    or ``sqlite:////absolute/bus.db``. ``namespace`` prefixes the tables, so several buses can share
    one file.
    """

    path: str = "choreograph.db"
    busy_timeout: float = 5.0
    """Seconds a write waits for another process' write lock before failing with TransportError."""
    poll_interval: float = 0.02
    """Longest wait, in seconds, between two checks for new messages while idle."""
    min_poll_interval: float = 0.002
    """Shortest wait between two checks, right after activity; the wait doubles up to
    ``poll_interval`` while nothing happens."""
    synchronous: str = "normal"
    """``normal``: a commit survives the crash of any process, but the last commits before a
    power loss or OS crash may be lost. ``full``: fsync on every commit, survives those too."""

    def __post_init__(self) -> None:
        if self.busy_timeout < 0:
            raise ConfigurationError(f"busy_timeout must be >= 0 seconds, got {self.busy_timeout}")
        if not 0 < self.min_poll_interval <= self.poll_interval <= 10:
            raise ConfigurationError(
                "poll intervals must satisfy 0 < min_poll_interval <= poll_interval <= 10 seconds, "
                f"got min_poll_interval={self.min_poll_interval}, "
                f"poll_interval={self.poll_interval}"
            )
        if self.synchronous not in _SYNCHRONOUS:
            raise ConfigurationError(
                f"synchronous must be one of {', '.join(_SYNCHRONOUS)}, got {self.synchronous!r}"
            )

    @classmethod
    def from_url(cls, url: str) -> Self:
        parts = urlsplit(url)
        if parts.scheme != "sqlite":
            raise ConfigurationError(f"not a sqlite:// URL: {redact(url)!r}")
        if parts.netloc:
            raise ConfigurationError(
                f"sqlite URL {redact(url)!r} has a host ({parts.hostname!r}); use sqlite:///rel.db "
                "for a relative path or sqlite:////abs/path.db for an absolute one"
            )
        path = unquote(parts.path)[1:]
        if not path or path.endswith("/"):
            raise ConfigurationError(f"sqlite URL {redact(url)!r} names no file (sqlite:///bus.db)")
        if path == ":memory:":
            raise ConfigurationError(
                "sqlite:///:memory: cannot be shared by connections; use memory:// instead"
            )
        options = sorted(f.name for f in fields(cls) if f.name not in ("url", "path"))
        for key, _ in parse_qsl(parts.query, keep_blank_values=True):
            if key not in options:
                raise ConfigurationError(
                    f"unknown option {key!r} in transport URL {redact(url)}; "
                    f"known: {', '.join(options)} (the file is the URL's path)"
                )
        return replace(super().from_url(url), path=path)


class _Schema:
    """The SQL of one namespace: every table name carries the namespace prefix, quoted (a
    namespace may hold '-')."""

    def __init__(self, ns: str) -> None:
        queue, groups = f'"{ns}_queue"', f'"{ns}_groups"'
        bindings, dead = f'"{ns}_bindings"', f'"{ns}_dead_letters"'
        self.create = f"""
            CREATE TABLE IF NOT EXISTS {groups} (grp TEXT PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS {bindings} (
                topic TEXT NOT NULL, grp TEXT NOT NULL, PRIMARY KEY (topic, grp)
            ) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS {queue} (
                did INTEGER PRIMARY KEY AUTOINCREMENT,
                grp TEXT NOT NULL,
                available_at REAL NOT NULL,
                attempt INTEGER NOT NULL DEFAULT 0,
                leased INTEGER NOT NULL DEFAULT 0,
                id TEXT NOT NULL,
                topic TEXT NOT NULL,
                published_at REAL NOT NULL,
                body BLOB NOT NULL
            );
            CREATE INDEX IF NOT EXISTS "{ns}_queue_due" ON {queue} (grp, available_at);
            CREATE TABLE IF NOT EXISTS {dead} (
                dlid INTEGER PRIMARY KEY AUTOINCREMENT,
                grp TEXT NOT NULL,
                id TEXT NOT NULL,
                topic TEXT NOT NULL,
                body BLOB NOT NULL,
                reason TEXT NOT NULL,
                error_type TEXT NOT NULL,
                error TEXT NOT NULL,
                attempts INTEGER NOT NULL,
                failed_at REAL NOT NULL,
                traceback TEXT NOT NULL DEFAULT ''
            );
            CREATE INDEX IF NOT EXISTS "{ns}_dead_letters_grp" ON {dead} (grp, dlid);
        """
        insert = f"INSERT INTO {queue} (grp, available_at, id, topic, published_at, body)"
        self.declare_group = f"INSERT OR IGNORE INTO {groups} (grp) VALUES (?)"
        self.bind = f"INSERT OR IGNORE INTO {bindings} (topic, grp) VALUES (?, ?)"
        # one statement per message fans it out to every group bound to its topic
        self.fan_out = f"{insert} SELECT grp, ?1, ?2, ?3, ?1, ?4 FROM {bindings} WHERE topic = ?3"
        self.to_group = f"{insert} VALUES (?, ?, ?, ?, ?, ?)"
        self.next_due = (
            f"SELECT available_at FROM {queue} WHERE grp = ? ORDER BY available_at LIMIT 1"
        )
        self.claim = (
            f"UPDATE {queue} SET available_at = ?1, attempt = attempt + 1, leased = 1 "
            f"WHERE did IN (SELECT did FROM {queue} WHERE grp = ?2 AND available_at <= ?3 "
            "ORDER BY available_at, did LIMIT ?4) RETURNING did, attempt, id, topic, body"
        )
        self.ack = f"DELETE FROM {queue} WHERE did = ? AND attempt = ?"
        self.release = (
            f"UPDATE {queue} SET available_at = ?, leased = 0 WHERE did = ? AND attempt = ?"
        )
        self.bury = (
            f"INSERT INTO {dead} "
            "(grp, id, topic, body, reason, error_type, error, traceback, attempts, failed_at) "
            f"SELECT grp, id, topic, body, ?, ?, ?, ?, attempt, ? FROM {queue} "
            "WHERE did = ? AND attempt = ?"
        )
        # a message too big to send: a dead letter (attempts 0) for each group it was meant for
        self.bury_unsent = (
            f"INSERT INTO {dead} "
            "(grp, id, topic, body, reason, error_type, error, attempts, failed_at) "
            "SELECT grp, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?1 FROM "
            f"(SELECT grp FROM {bindings} WHERE ?8 IS NULL AND topic = ?3 UNION ALL SELECT ?8 "
            "WHERE ?8 IS NOT NULL)"
        )
        # files made before dead letters kept their traceback get the column on open
        self.dead_has_traceback = (
            f"SELECT 1 FROM pragma_table_info('{ns}_dead_letters') WHERE name = 'traceback'"
        )
        self.add_traceback = f"ALTER TABLE {dead} ADD COLUMN traceback TEXT NOT NULL DEFAULT ''"
        dead_columns = (
            "dlid, grp, id, topic, body, reason, error_type, error, traceback, attempts, failed_at"
        )
        self.dead_all = f"SELECT {dead_columns} FROM {dead} ORDER BY dlid LIMIT ?"
        self.dead_of = f"SELECT {dead_columns} FROM {dead} WHERE grp = ? ORDER BY dlid LIMIT ?"
        self.dead_by_id = f"SELECT {dead_columns} FROM {dead} WHERE dlid = ?"
        self.dead_one = f"SELECT grp, id, topic, body FROM {dead} WHERE dlid = ?"
        self.forget_dead = f"DELETE FROM {dead} WHERE dlid = ?"
        self.group_known = f"SELECT 1 FROM {groups} WHERE grp = ?"
        self.lag = (
            f"SELECT count(*) FROM {queue} WHERE grp = ?1 AND (leased = 0 OR available_at <= ?2)"
        )


class SqliteTransport(Transport):
    """The embedded bus in one SQLite file, shared by every process that opens it."""

    scheme = "sqlite"
    member_order = "group"
    gives_back_in_order = True

    def __init__(self, settings: SqliteSettings) -> None:
        self.settings = settings
        self._sql = _Schema(settings.namespace)
        self._db: sqlite3.Connection | None = None
        self._subscriptions: set[SqliteSubscription] = set()
        self._doorbell: Doorbell | None = None

    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(SqliteSettings.from_url(url))

    async def connect(self) -> None:
        if self._db is not None:
            return
        path = self.settings.path
        if not Path(path).parent.is_dir():
            raise ConfigurationError(
                f"cannot open the sqlite bus {path!r}: directory {str(Path(path).parent)!r} "
                "does not exist"
            )
        # A process opening a fresh file can find it busy without SQLite's busy handler being
        # called (switching to WAL, WAL recovery): try again until busy_timeout has passed.
        give_up = time.monotonic() + self.settings.busy_timeout
        while True:
            try:
                self._db = self._open(path)
                self._doorbell = Doorbell(path)
                return
            except sqlite3.OperationalError as exc:
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy:
                    raise ConfigurationError(
                        f"cannot open the sqlite bus {path!r}: {exc}"
                    ) from None
                if time.monotonic() > give_up:
                    raise TransportError(f"the sqlite bus {path!r} is locked: {exc}") from exc
            except sqlite3.DatabaseError as exc:
                raise ConfigurationError(f"cannot use {path!r} as a sqlite bus: {exc}") from None
            await asyncio.sleep(0.01)

    def _open(self, path: str) -> sqlite3.Connection:
        private_file(path)
        db = sqlite3.connect(path, timeout=self.settings.busy_timeout, isolation_level=None)
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.settings.synchronous.upper()}")
            db.execute("PRAGMA journal_size_limit=67108864")
            db.execute("BEGIN IMMEDIATE")
            for statement in self._sql.create.split(";"):
                if statement.strip():
                    db.execute(statement)
            if db.execute(self._sql.dead_has_traceback).fetchone() is None:
                db.execute(self._sql.add_traceback)
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        return db

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            await sub.close()
        if self._doorbell is not None:
            self._doorbell.close()
            self._doorbell = None
        if self._db is not None:
            self._db.close()
            self._db = None

    async def declare_group(self, group: str, topics: Collection[str]) -> None:
        check_group(group)
        with self._write() as db:
            db.execute(self._sql.declare_group, (group,))
            db.executemany(self._sql.bind, [(topic, group) for topic in topics])

    async def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        fits, over = split_oversized(messages, self.max_message_bytes)
        now = time.time()
        fan_out = [(now, m.id, m.topic, m.body) for m in fits if m.group is None]
        targeted = [(m.group, now, m.id, m.topic, now, m.body) for m in fits if m.group]
        buried = []
        for message in over:
            ref, why = oversized(message, self.max_message_bytes)
            buried.append((now, ref.id, ref.topic, ref.body, why.reason, why.error_type,
                           why.error, ref.group))  # fmt: skip
        with self._write() as db:
            if fan_out:
                db.executemany(self._sql.fan_out, fan_out)
            if targeted:
                db.executemany(self._sql.to_group, targeted)
            if buried:  # in the same transaction: published and buried together, or neither
                db.executemany(self._sql.bury_unsent, buried)
        self._wake_all()
        if self._doorbell is not None:
            self._doorbell.ring()

    async def subscribe(
        self, group: str, topics: Collection[str], *, lease: float = 30.0
    ) -> SqliteSubscription:
        if lease <= 0:
            raise ConfigurationError(f"lease must be > 0 seconds, got {lease}")
        await self.declare_group(group, topics)
        sub = SqliteSubscription(self, group, frozenset(topics), lease)
        self._subscriptions.add(sub)
        if self._doorbell is not None:
            self._doorbell.listen(self._wake_all)
        return sub

    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        with self._read() as db:
            if group is None:
                rows = db.execute(self._sql.dead_all, (limit,)).fetchall()
            else:
                rows = db.execute(self._sql.dead_of, (group, limit)).fetchall()
        return [_dead_letter(row) for row in rows]

    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        key = _dead_letter_key(dead_letter_id)
        if key is None:
            return None
        with self._read() as db:
            row = db.execute(self._sql.dead_by_id, (key,)).fetchone()
        return None if row is None else _dead_letter(row)

    async def replay(self, dead_letter_id: str, body: bytes | None = None) -> bool:
        key = _dead_letter_key(dead_letter_id)
        if key is None:
            return False
        if body is not None and len(body) > self.max_message_bytes:
            raise PayloadTooLarge(
                f"replacement body is {len(body)} bytes; the limit is {self.max_message_bytes}"
            )
        now = time.time()
        with self._write() as db:
            row = db.execute(self._sql.dead_one, (key,)).fetchone()
            if row is None:
                return False
            group, event_id, topic, old_body = row
            new_body = old_body if body is None else body
            db.execute(self._sql.to_group, (group, now, event_id, topic, now, new_body))
            db.execute(self._sql.forget_dead, (key,))
        self._wake_group(group)
        if self._doorbell is not None:
            self._doorbell.ring()
        return True

    async def discard(self, dead_letter_id: str) -> bool:
        key = _dead_letter_key(dead_letter_id)
        if key is None:
            return False
        with self._write() as db:
            return db.execute(self._sql.forget_dead, (key,)).rowcount > 0

    async def lag(self, group: str) -> int | None:
        with self._read() as db:
            if db.execute(self._sql.group_known, (group,)).fetchone() is None:
                return None
            count: int = db.execute(self._sql.lag, (group, time.time())).fetchone()[0]
        return count

    # used by SqliteSubscription -----------------------------------------------------------------

    def _wake_all(self) -> None:
        """Our own commits do not change our connection's data_version: wake local members."""
        for sub in self._subscriptions:
            sub._wake()

    def _wake_group(self, group: str) -> None:
        for sub in self._subscriptions:
            if sub.group == group:
                sub._wake()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise TransportError("the sqlite transport is not connected (call connect())")
        return self._db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction; SQLite errors become TransportError."""
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise TransportError(f"sqlite bus {self.settings.path!r}: {exc}") from exc

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        try:
            yield db
        except sqlite3.Error as exc:
            raise TransportError(f"sqlite bus {self.settings.path!r}: {exc}") from exc

    def _data_version(self) -> int:
        with self._read() as db:
            version: int = db.execute("PRAGMA data_version").fetchone()[0]
        return version

    def _claim(self, group: str, max_messages: int, lease: float) -> tuple[list[Delivery], float]:
        """Lease up to ``max_messages`` due rows of ``group``. Returns them, and when the next row
        of the group comes due (``inf`` when the group's queue is empty)."""
        now = time.time()
        with self._read() as db:
            row = db.execute(self._sql.next_due, (group,)).fetchone()
        if row is None:
            return [], float("inf")
        if row[0] > now:
            return [], row[0]
        with self._write() as db:
            rows = db.execute(self._sql.claim, (now + lease, group, now, max_messages)).fetchall()
        rows.sort()
        deliveries = [
            Delivery(Message(event_id, topic, body), attempt, (did, attempt))
            for did, attempt, event_id, topic, body in rows
        ]
        # more may be due right away: ask again rather than guess
        return deliveries, now


def _dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    dlid, group, event_id, topic, body, reason, error_type, error, trace, attempts, failed_at = row
    return DeadLetter(
        id=str(dlid),
        group=group,
        message=Message(event_id, topic, body),
        failure=Failure(reason, error_type, error, trace),
        attempts=attempts,
        failed_at=failed_at,
    )


def _dead_letter_key(dead_letter_id: str) -> int | None:
    """The row id a dead-letter id names, or None when it cannot name one (so: no such letter)."""
    valid = dead_letter_id.isascii() and dead_letter_id.isdigit() and len(dead_letter_id) < 19
    return int(dead_letter_id) if valid else None


class SqliteSubscription(Subscription):
    """One member of a group. Its unsettled claims are released when it closes."""

    def __init__(self, bus: SqliteTransport, group: str, topics: frozenset[str], lease: float):
        self._bus = bus
        self.group = group
        self.topics = topics
        self._lease = lease
        self._held: set[tuple[int, int]] = set()
        self._wakeup = asyncio.Event()
        self._interval = bus.settings.min_poll_interval
        self._closed = False

    def _wake(self) -> None:
        self._wakeup.set()

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        if self._closed:
            raise TransportError("subscription is closed")
        if max_messages < 1:
            return []
        settings = self._bus.settings
        deadline = time.monotonic() + timeout
        next_due = 0.0  # epoch seconds; 0 forces a first check
        version = -1
        while True:
            seen = self._bus._data_version()
            if seen != version or self._wakeup.is_set() or time.time() >= next_due:
                self._wakeup.clear()
                version = seen
                deliveries, next_due = self._bus._claim(self.group, max_messages, self._lease)
                if deliveries:
                    # busy: look again soon; commits for other groups do not count as activity
                    self._interval = settings.min_poll_interval
                    self._held.update(d.handle for d in deliveries)
                    return deliveries
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                return []
            wait = min(self._interval, remaining, max(0.0, next_due - time.time()))
            try:
                async with asyncio.timeout(wait):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            if self._closed:  # closed while waiting (maybe with its transport)
                return []
            self._interval = min(self._interval * 2, settings.poll_interval)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        handles = [d.handle for d in deliveries]
        with self._bus._write() as db:
            db.executemany(self._bus._sql.ack, handles)
        self._held.difference_update(handles)

    async def retry(self, delivery: Delivery, delay: float) -> None:
        due = time.time() + max(0.0, delay)
        did, attempt = delivery.handle
        with self._bus._write() as db:
            db.execute(self._bus._sql.release, (due, did, attempt))
        self._held.discard(delivery.handle)
        if delay <= 0:
            self._bus._wake_group(self.group)

    async def dead_letter(self, delivery: Delivery, failure: Failure) -> None:
        did, attempt = delivery.handle
        sql = self._bus._sql
        with self._bus._write() as db:
            bury = (
                failure.reason, failure.error_type, failure.error, failure.traceback,
                time.time(), did, attempt,
            )  # fmt: skip
            if db.execute(sql.bury, bury).rowcount:
                db.execute(sql.ack, (did, attempt))
        self._held.discard(delivery.handle)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        self._bus._subscriptions.discard(self)
        if self._held and self._bus._db is not None:
            now = time.time()
            with self._bus._write() as db:
                db.executemany(self._bus._sql.release, [(now, *h) for h in self._held])
            self._held.clear()
            self._bus._wake_group(self.group)
