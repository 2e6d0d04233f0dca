"""A service's own database: its state, inbox, outbox and timers, changed in one transaction.

Every handling runs in a :meth:`Store.transaction`: the handler's state changes, the inbox record
(this event id was processed) and the outbox rows (the events it emits) commit together or not at
all. The relay publishes committed outbox rows and then marks them sent, so a crash anywhere
re-publishes (consumers dedupe by event id) but never loses an event.

Stores are chosen by URL: ``sqlite:///path.db`` (default, one file per service), ``memory://``
(SQLite in memory, for tests), ``postgresql://user@host/db`` (production; see
:mod:`choreograph.stores.postgres`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from choreograph.errors import ConfigurationError
from choreograph.transport import load_backend, redact


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One event waiting to be published, not before ``due_at`` (epoch seconds)."""

    id: str
    topic: str
    body: bytes
    due_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Timer:
    """A pending deadline or join timeout of a service, keyed by ``(name, key)``."""

    name: str
    key: str
    due_at: float
    data: dict[str, Any]


Locks = Literal["wait", "raise", "none"]
"""How a transaction locks the documents it touches (see :meth:`Store.transaction`)."""


class DocumentBusy(BaseException):
    """Raised by a ``locks="raise"`` transaction touching something another transaction holds.

    The runtime rolls back the handling's savepoint (which releases what it locked), commits the
    rest of the batch and handles the message again in a transaction that first waits for
    :attr:`lock`. It derives from ``BaseException`` so that a handler's ``except Exception``
    cannot swallow it and carry on without the lock.
    """

    def __init__(self, lock: tuple[str, str]) -> None:
        super().__init__(f"{lock[0]}:{lock[1]} is held by another transaction")
        self.lock = lock
        """What is held, to pass in ``lock_first`` (an opaque pair for the caller)."""


class StoreTx(ABC):
    """One open transaction. Methods are only valid inside ``async with store.transaction()``.

    A transaction of a store with per-key locking (PostgreSQL) locks each document it reads or
    writes (``get``, ``put``, ``delete``, what ``find`` returns), the transaction end of each
    correlation id it checks or records, the timers of each key it sets or cancels, and each
    event id it asks ``seen`` about, until it ends. ``count`` locks nothing.
    """

    @property
    @abstractmethod
    def connection(self) -> Any:
        """The database connection this transaction runs on: an ``asyncpg`` connection on
        PostgreSQL, a ``sqlite3.Connection`` on SQLite. Statements run on it belong to the
        transaction (and to the savepoint open at the time); never commit, roll back or close it.
        """

    # the service's own documents ------------------------------------------------------------
    @abstractmethod
    async def get(self, kind: str, key: str) -> dict[str, Any] | None: ...

    @abstractmethod
    async def put(self, kind: str, key: str, doc: dict[str, Any]) -> None: ...

    @abstractmethod
    async def delete(self, kind: str, key: str) -> bool: ...

    @abstractmethod
    async def find(
        self,
        kind: str,
        where: dict[str, Any] | None = None,
        limit: int = 100,
        *,
        skip_locked: bool = False,
    ) -> list[tuple[str, dict[str, Any]]]:
        """Documents of ``kind`` whose top-level fields equal ``where``'s, by key order.

        ``where`` values are JSON scalars (str, int, float, bool, None); a field of that name
        holding a list or an object never matches.

        Each document returned is locked and matched again once locked, so it still matches
        when the transaction writes it. ``skip_locked`` leaves out the documents another
        transaction holds instead of waiting for them: the way to *reserve* one of many (a free
        drone) while other replicas reserve others. Never use it to list what must all be seen.
        """

    async def read_ahead(self, docs: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
        """Read ``docs`` now, for handlings of this transaction about to ``get`` them: a store
        whose every read is a round trip (PostgreSQL) reads and locks them all in one statement,
        each as ``get`` would, and the first ``get`` of one afterwards returns what was read
        (unless the transaction put or deleted it since). Returns the documents another
        transaction holds (``locks="raise"``), which were not read. By default nothing is read
        ahead: ``get`` is as cheap."""
        return set()

    @abstractmethod
    async def count(self, kind: str, where: dict[str, Any] | None = None) -> int:
        """How many documents match ``where`` now (locks nothing: it may change before the
        transaction commits)."""

    @abstractmethod
    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """A nested scope rolled back alone when an exception leaves it."""

    # inbox -------------------------------------------------------------------------------------
    @abstractmethod
    async def seen(self, event_id: str) -> bool:
        """Whether ``event_id`` was handled (remembered by a committed transaction, or by this
        one). While this transaction runs, another asking about the same id waits for it: of two
        replicas handling one event at once, the second sees it handled, or handles it itself if
        the first rolled back."""

    @abstractmethod
    async def remember(self, event_id: str, at: float) -> None: ...

    async def seen_many(self, event_ids: Sequence[str]) -> set[str]:
        """Which of ``event_ids`` were processed (one query for a batch where the store can).
        Like ``seen``, the others are this transaction's from now on."""
        return {event_id for event_id in event_ids if await self.seen(event_id)}

    # ended transactions ------------------------------------------------------------------------
    @abstractmethod
    async def end_transaction(self, correlation_id: str, event_type: str, at: float) -> None:
        """Remember that the transaction ``correlation_id`` ended with ``event_type`` (one of the
        app's terminal events). The first ending is kept; ending it again changes nothing."""

    @abstractmethod
    async def transaction_ended(self, correlation_id: str) -> str | None:
        """The terminal event type that ended ``correlation_id``, or None while it is open (or
        once it ended longer ago than the inbox horizon)."""

    async def ended_transactions(self, correlation_ids: Collection[str]) -> dict[str, str]:
        """:meth:`transaction_ended` for many: the terminal event type of each of
        ``correlation_ids`` that ended (one query for a batch where the store can)."""
        ended = {}
        for correlation_id in correlation_ids:
            event_type = await self.transaction_ended(correlation_id)
            if event_type is not None:
                ended[correlation_id] = event_type
        return ended

    # outbox ------------------------------------------------------------------------------------
    @abstractmethod
    async def add_outbox(self, rows: Sequence[OutboxRow], claimed_until: float = 0.0) -> None:
        """Queue rows for publishing. Until ``claimed_until`` the relay leaves them alone: the
        caller publishes them itself right after the commit (the fast path)."""

    @abstractmethod
    async def forget_outbox(self, ids: Sequence[str]) -> None:
        """Delete rows the caller has published (rows committed by an earlier transaction)."""

    # timers ------------------------------------------------------------------------------------
    @abstractmethod
    async def set_timer(self, timer: Timer) -> None:
        """Create or replace the timer ``(name, key)``."""

    @abstractmethod
    async def cancel_timers(self, key: str, names: Sequence[str] | None = None) -> int:
        """Cancel the timers of ``key`` (all, or those named). Returns how many were pending."""

    @abstractmethod
    async def take_due_timers(self, now: float, limit: int) -> list[Timer]:
        """Remove and return timers due at ``now``, earliest first."""


class Store(ABC):
    """The database of one service."""

    url: str

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def transaction(
        self, *, locks: Locks = "wait", lock_first: Sequence[tuple[str, str]] = ()
    ) -> AbstractAsyncContextManager[StoreTx]:
        """A transaction. On a store with per-key locking (see :class:`StoreTx`):

        - ``locks="wait"``: touching what another transaction holds waits for it (the database
          breaks a deadlock by failing one of the transactions).
        - ``locks="raise"``: it raises :class:`DocumentBusy` instead, and never waits while it
          holds anything; the runtime's workers use this and never deadlock.
        - ``locks="none"``: nothing is locked; for reading (status pages, inspections).

        ``lock_first`` is taken before anything else, waiting, in one global order (what a
        ``DocumentBusy`` named). A store with one writer at a time (SQLite) ignores both.
        """

    @abstractmethod
    async def claim_outbox(self, now: float, limit: int, lease: float) -> list[OutboxRow]:
        """Due, unsent rows, leased to this caller for ``lease`` seconds so that other replicas'
        relays skip them."""

    @abstractmethod
    async def mark_sent(self, ids: Sequence[str]) -> None: ...

    @abstractmethod
    async def next_timer_due(self) -> float | None: ...

    @abstractmethod
    async def list_timers(self, key: str | None = None, limit: int = 100) -> list[Timer]: ...

    @abstractmethod
    async def cancel_timer(self, name: str, key: str) -> bool: ...

    @abstractmethod
    async def prune_inbox(self, before: float) -> int:
        """Forget processed event ids, and ended transactions, recorded before ``before``;
        returns how many records were forgotten."""


_STORES: dict[str, tuple[str, str, str | None]] = {
    "sqlite": ("choreograph.stores.sqlite", "SqliteStore", None),
    "memory": ("choreograph.stores.sqlite", "SqliteStore", None),
    "postgresql": ("choreograph.stores.postgres", "PostgresStore", "postgres"),
    "postgres": ("choreograph.stores.postgres", "PostgresStore", "postgres"),
}


def check_not_shared(url: str, services: Sequence[str]) -> None:
    """Refuse a store URL under which several of ``services`` would share one store: one inbox
    for all, where each would skip the others' events as duplicates and transactions would stall
    with no error. A URL with ``{service}`` gives each its own; so do ``memory://`` (a database per
    store) and PostgreSQL without ``schema=`` (a schema per service)."""
    if "{service}" in url or len(set(services)) < 2:
        return
    parts = urlsplit(url)
    if parts.scheme == "memory":
        return
    if parts.scheme in ("postgresql", "postgres") and "schema=" not in parts.query:
        return
    raise ConfigurationError(
        f"the store URL {redact(url)} has no {{service}}: services {', '.join(services)} would "
        "share one store (one inbox: each would skip the others' events as duplicates). Put "
        "{service} in it, e.g. sqlite:///.choreograph/{service}.db"
    )


def store_from_url(url: str, service: str) -> Store:
    """Create (not yet opened) the store a URL names; ``{service}`` in it is replaced by the
    service's name, so one template serves every service."""
    url = url.replace("{service}", service)
    scheme = urlsplit(url).scheme
    if scheme not in _STORES:
        raise ConfigurationError(
            f"unknown store {redact(url)!r}; use sqlite:///path.db, memory:// or postgresql://..."
        )
    module_name, class_name, extra = _STORES[scheme]
    backend = load_backend(module_name, class_name, extra, f"{scheme}:// store")
    store: Store = backend.from_url(url, service)
    return store
