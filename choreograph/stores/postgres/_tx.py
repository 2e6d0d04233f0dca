"""A PostgreSQL store's transaction: its connection class, its savepoint frames, and the
buffers of inbox rows, outbox rows and puts it writes at the commit."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import asyncpg  # type: ignore[import-untyped]
import orjson

from choreograph.store import DocumentBusy, OutboxRow, StoreTx, Timer
from choreograph.stores.postgres._schema import _ENDED, _TIMERS, _puts_sql, _timers_sql, _Where

_WRITTEN = b"w"  # marks a buffered end already written (JSON never starts with it)
# The state of a timer this transaction knows of (else its JSON ``[due_at, data]``, to write)
_PRESENT = b""  # in the database as it is
_GONE = b"-"  # to delete


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
    orm_session: Any = None
    """The session a handling that succeeded left here, cleared, for the next (choreograph.orm)."""

    def unproxied(self) -> StoreConnection:
        """This connection itself, not the pool's proxy of it (which dies when it is released)."""
        return self

    def opening_savepoints(self, before: Callable[[], Awaitable[None]] | None) -> None:
        self._before = before

    async def before_statement(self) -> None:
        if self._before is not None:
            await self._before()

    async def prepare_cached(self, query: str) -> Any:
        """A prepared statement of ``query`` from the connection's statement cache (as
        ``fetch`` uses it): parsed once for the connection's life. The statement object itself
        is valid until the connection goes back to the pool, like ``prepare``'s."""
        if self._before is not None:
            await self._before()
        return await self._prepare(query, use_cache=True)


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
    the transaction already holds, the ends of transactions it looked up, and the timers it sets
    and cancels (of keys it locked, reading their timers' names). Savepoints are
    opened lazily, before the first statement inside them, and released along with the next
    SAVEPOINT: a handling that only emits events and records its event id costs no round trip
    of its own.

    ``mode`` is how keys are locked (see ``lock_key`` in the schema). With ``claims``, ``seen``
    inserts the event id into the inbox at once (the row is the lock of the event), and the
    commit keeps the remembered ones and deletes the others."""

    def __init__(self, conn: Any, schema_sql: str, mode: int, *, claims: bool) -> None:
        self._conn = conn  # the pool's proxy of a StoreConnection
        self._raw: StoreConnection = conn.unproxied()
        self._raw.opening_savepoints(self._before_user_statement)
        self._s = schema_sql  # the quoted schema name
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
        # Documents read ahead (held), each until its first get, or a put or delete of it.
        self._ahead: dict[tuple[str, str], dict[str, Any] | None] = {}
        # The timers of the keys this transaction locked: key -> name -> state (see _PRESENT).
        self._timers: dict[str, dict[str, bytes]] = {}
        # (dict, key, value before) of each change of _puts and _timers since the outermost
        # savepoint began (None: absent)
        self._journal: list[tuple[dict[Any, Any], Any, Any]] = []
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
        timers = self._take_timers()
        await asyncpg.Connection.execute(
            self._raw,
            f"WITH forgotten AS (DELETE FROM {s}.inbox WHERE event_id = ANY($1::text[])), "
            f"kept AS (INSERT INTO {s}.inbox (event_id, at) "
            "SELECT * FROM unnest($2::text[], $3::float8[]) "
            # a claimed row already says when, to the second, unless the clock is another one
            "ON CONFLICT (event_id) DO UPDATE SET at = EXCLUDED.at "
            "WHERE abs(inbox.at - EXCLUDED.at) > 1), "
            f"{_puts_sql(s, '$9', '$10', '$11')}, {_timers_sql(s, '$12', '$13', '$14')} "
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
            *timers,
        )
        self._inbox, self._outbox, self._claimed = [], [], set()

    # buffered puts -----------------------------------------------------------------------------

    def _hold(self, doc: tuple[str, str]) -> None:
        # (a savepoint rolled back forgets it: at worst its next put locks it again)
        if doc not in self._held:
            self._held.add(doc)
            if self._frames:
                self._frames[-1].held.append(doc)

    def _set(self, where: dict[Any, Any], key: Any, value: Any) -> None:
        """``where[key] = value`` (None: drop it), journaled for savepoints."""
        if self._frames:
            self._journal.append((where, key, where.get(key)))
        if value is None:
            where.pop(key, None)
        else:
            where[key] = value

    def _buffer(self, doc: tuple[str, str], data: bytes | None) -> None:
        """Set (``data``) or drop (None) the buffered put of ``doc``, journaled for savepoints."""
        self._set(self._puts, doc, data)

    def _take_puts(self, *, ends: bool = True) -> tuple[list[str], list[str], list[str]]:
        """The buffered puts not written yet (the ends of transactions only with ``ends``), as
        the three arrays of ``_puts_sql``. Documents leave the buffer; an end stays, marked
        written, so that it is still known."""
        taken = {
            doc: data
            for doc, data in self._puts.items()
            if not data.startswith(_WRITTEN) and (ends or doc[0] != _ENDED)
        }
        if self._frames:
            self._journal += [(self._puts, doc, data) for doc, data in taken.items()]
        for doc, data in taken.items():
            if doc[0] == _ENDED:
                self._puts[doc] = _WRITTEN + data
            else:
                del self._puts[doc]
        return [k for k, _ in taken], [kk for _, kk in taken], [d.decode() for d in taken.values()]

    def _unwritten(self, *, everything: bool = True) -> bool:
        if any(
            not data.startswith(_WRITTEN) and (everything or doc[0] != _ENDED)
            for doc, data in self._puts.items()
        ):
            return True
        return everything and any(self._pending_timers())

    async def _write_puts(self, *, everything: bool = False) -> None:
        """Write the buffered documents now (before a statement that may read them); with
        ``everything``, the ends of transactions and the timers too (else they wait for the
        commit: only the store reads them)."""
        if not self._unwritten(everything=everything):
            return
        await self._sync()
        s = self._s
        if everything:
            await asyncpg.Connection.execute(
                self._raw,
                f"WITH {_puts_sql(s, '$1', '$2', '$3')}, {_timers_sql(s, '$4', '$5', '$6')} "
                "SELECT 1",
                *self._take_puts(),
                *self._take_timers(),
            )
        else:
            await asyncpg.Connection.execute(
                self._raw,
                f"WITH {_puts_sql(s, '$1', '$2', '$3')} SELECT 1",
                *self._take_puts(ends=False),
            )

    async def _before_user_statement(self) -> None:
        """A handler's own statement on ``ctx.connection`` sees its savepoint and its
        documents."""
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
        if (kind, key) in self._ahead:  # (once: the handler may change the dict it gets)
            return self._ahead.pop((kind, key))
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

    async def read_ahead(self, docs: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
        # In one order (a "wait" transaction waits in it), outside any savepoint, like get.
        wanted = sorted(
            doc
            for doc in set(docs)
            if doc not in self._puts and doc not in self._ahead and doc[0] != _ENDED
        )
        if not wanted:
            return set()
        kinds, keys = [kind for kind, _ in wanted], [key for _, key in wanted]
        if not self._mode:
            rows = await self._read(
                f"SELECT u.k, u.kk, true, s.doc FROM unnest($1::text[], $2::text[]) AS u(k, kk) "
                f"LEFT JOIN {self._s}.state AS s ON s.kind = u.k AND s.key = u.kk",
                kinds,
                keys,
            )
        else:
            rows = await self._read(
                "SELECT u.k, u.kk, g.ok, g.got FROM unnest($1::text[], $2::text[]) "
                f"WITH ORDINALITY AS u(k, kk, i), LATERAL {self._s}.get_doc(u.k, u.kk, $3) AS g "
                "ORDER BY u.i",
                kinds,
                keys,
                self._mode,
            )
        busy: set[tuple[str, str]] = set()
        for kind, key, ok, doc in rows:
            if ok:
                self._hold((kind, key))
                self._ahead[(kind, key)] = doc
            else:
                busy.add((kind, key))
        return busy

    async def put(self, kind: str, key: str, doc: dict[str, Any]) -> None:
        self._ahead.pop((kind, key), None)
        data = orjson.dumps(doc)
        if b"\\u0000" not in data:
            # Locked (taken now if need be, outside the handling's savepoint, like a read), the
            # write waits for the next statement that reads documents, or the commit. (A NUL,
            # which PostgreSQL refuses in JSON, is written at once: the handling fails in its
            # own savepoint.)
            if self._mode and (kind, key) not in self._held:
                locked = await self._read_val(
                    f"SELECT {self._s}.lock_key($1, $2, $3)", kind, key, self._mode
                )
                if not locked:
                    raise DocumentBusy((kind, key))
                self._hold((kind, key))
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
        self._ahead.pop((kind, key), None)
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
            for where, key, value in reversed(self._journal[frame.journal :]):
                if value is None:
                    where.pop(key, None)
                else:
                    where[key] = value
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

    async def _timers_of(self, key: str) -> dict[str, bytes]:
        """The timers of ``key``, locked (one statement the first time, outside the handling's
        savepoint: the lock lasts, at worst, until the commit)."""
        names = self._timers.get(key)
        if names is None:
            row = await self._read_row(
                f"SELECT ok, names FROM {self._s}.timer_names($1, $2)", key, self._mode
            )
            if not row["ok"]:
                raise DocumentBusy((_TIMERS, key))
            names = dict.fromkeys(row["names"], _PRESENT)
            self._set(self._timers, key, names)
        return names

    def _pending_timers(self) -> Iterator[tuple[str, str, bytes]]:
        for key, names in self._timers.items():
            for name, state in names.items():
                if state != _PRESENT:
                    yield name, key, state

    def _take_timers(self) -> tuple[list[str], list[str], list[str | None]]:
        """The timers to write, as the three arrays of ``_timers_sql``; they are then as the
        database holds them."""
        pending = list(self._pending_timers())
        for name, key, state in pending:
            self._set(self._timers[key], name, None if state == _GONE else _PRESENT)
        return (
            [name for name, _, _ in pending],
            [key for _, key, _ in pending],
            [None if state == _GONE else state.decode() for _, _, state in pending],
        )

    async def set_timer(self, timer: Timer) -> None:
        names = await self._timers_of(timer.key)
        data = orjson.dumps([timer.due_at, timer.data])
        self._set(names, timer.name, data)
        if b"\\u0000" in data:  # refused by PostgreSQL: fail now, in the handling's savepoint
            await self._write_puts(everything=True)

    async def cancel_timers(self, key: str, names: Sequence[str] | None = None) -> int:
        timers = await self._timers_of(key)
        gone = [
            name
            for name, state in timers.items()
            if state != _GONE and (names is None or name in names)
        ]
        for name in gone:
            self._set(timers, name, _GONE)
        return len(gone)

    async def take_due_timers(self, now: float, limit: int) -> list[Timer]:
        # A timer being fired by another transaction, or whose key's timers another handling
        # is setting or cancelling, is skipped rather than waited for.
        await self._write_puts(everything=True)
        rows = await self._fetch(
            f"SELECT name, key, due_at, data FROM {self._s}.take_timers($1, $2, $3)",
            now,
            limit,
            self._mode,
        )
        taken = [_timer(row) for row in rows]
        for timer in taken:  # gone from the database: gone from what this transaction knows
            if timer.key in self._timers:
                self._set(self._timers[timer.key], timer.name, None)
        return sorted(taken, key=lambda t: t.due_at)
