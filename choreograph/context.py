"""What a handler sees besides its event: the transaction it runs in and the service's state."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from choreograph.clock import Clock
from choreograph.envelope import Envelope
from choreograph.events import Event
from choreograph.store import StoreTx
from choreograph.transport import load_backend

if TYPE_CHECKING:
    from choreograph.orm import TransactionSession


class State:
    """The service's own documents, read and written in the handling's transaction.

    Documents are JSON objects addressed by ``(kind, key)``. Changes commit together with the
    inbox record and the emitted events, or not at all.
    """

    __slots__ = ("_read", "_session", "_tx")

    def __init__(self, tx: StoreTx) -> None:
        self._tx = tx
        self._session: TransactionSession | None = None
        self._read: list[tuple[str, str]] = []  # what get asked for (the runtime reads ahead)

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        self._read.append((kind, key))
        return await self._tx.get(kind, key)

    async def put(self, kind: str, key: str, doc: dict[str, Any]) -> None:
        await self._tx.put(kind, key, doc)

    async def delete(self, kind: str, key: str) -> bool:
        return await self._tx.delete(kind, key)

    async def find(
        self,
        kind: str,
        where: dict[str, Any] | None = None,
        limit: int = 100,
        *,
        skip_locked: bool = False,
    ) -> list[tuple[str, dict[str, Any]]]:
        """Documents whose top-level fields equal ``where``'s, by key order, each locked for
        this handling. ``skip_locked=True`` leaves out those another handling (another replica)
        holds right now: use it to reserve one of many, e.g.
        ``find("drone", {"status": "free"}, limit=1, skip_locked=True)``."""
        return await self._tx.find(kind, where, limit, skip_locked=skip_locked)

    async def count(self, kind: str, where: dict[str, Any] | None = None) -> int:
        """How many documents match now; locks nothing."""
        return await self._tx.count(kind, where)


def connection_of(state: State) -> Any:
    """The store transaction's connection (see :attr:`Context.connection`)."""
    return state._tx.connection


def session_of(state: State) -> TransactionSession:
    """The SQLAlchemy session on the store transaction, taken on first use (the one its
    connection keeps from an earlier handling, else a new one)."""
    if state._session is None:
        state._session = _open_session()(state._tx)
    return state._session


@functools.cache
def _open_session() -> Callable[[StoreTx], TransactionSession]:
    opener: Callable[[StoreTx], TransactionSession] = load_backend(
        "choreograph.orm", "handling_session", "sqlalchemy", "SQLAlchemy session (ctx.session)"
    )
    return opener


async def flush_session(state: State) -> None:
    """Write the session's pending changes (inside the handling's savepoint)."""
    if state._session is not None:
        await state._session._flush_changes()


async def release_session(state: State, *, succeeded: bool = False) -> None:
    """End the handling's use of its session, if it took one (no SQL; the store ends the
    transaction): once it ``succeeded``, the session is cleared and kept for the next handling
    on the same connection; else discarded, with whatever it held."""
    session, state._session = state._session, None
    if session is not None:
        await session._end_handling(succeeded=succeeded)


@dataclass(frozen=True, slots=True)
class TimerChange:
    """A timer set (with its due time, epoch seconds) or cancelled by one handling. A cancel with
    ``name`` None cancelled every timer of ``key`` (the transaction ended)."""

    action: Literal["set", "cancel"]
    name: str | None
    key: str
    due_at: float | None = None


@dataclass(slots=True)
class Context:
    """One handling: of a received event, of an expired timer, or of work started from outside
    (an HTTP request). Events emitted here carry its correlation id, and its event id as their
    causation id."""

    service: str
    envelope: Envelope
    """The event being handled (for a timer, the event that started it)."""
    attempt: int
    state: State
    clock: Clock
    handler: str = ""
    later: list[tuple[Event, float]] = field(default_factory=list)
    timers: list[TimerChange] = field(default_factory=list)
    """The timers this handling set or cancelled (reported to the flow recorder after the
    commit, so that it shows each timer's real due time)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Scratch space for middleware (e.g. the current span)."""

    @property
    def connection(self) -> Any:
        """The connection of the store transaction this handling runs in: an asyncpg connection
        on PostgreSQL, a ``sqlite3.Connection`` on SQLite. Your statements on it commit or roll
        back with the message (its savepoint), its inbox record and its emitted events. Never
        commit, roll back or close it. See the guide's "Your own tables" page."""
        return connection_of(self.state)

    @property
    def session(self) -> TransactionSession:
        """A SQLAlchemy ``AsyncSession`` on :attr:`connection` (``choreograph[sqlalchemy]``),
        opened on first use and flushed when the handler returns. Never commit, roll back or
        close it: raise an exception to roll the message's writes back."""
        return session_of(self.state)

    @property
    def correlation_id(self) -> str:
        return self.envelope.correlationid

    @property
    def event_id(self) -> str:
        return self.envelope.id

    def now(self) -> float:
        return self.clock.now()

    def emit_later(self, event: Event, delay: float) -> None:
        """Emit ``event`` ``delay`` seconds after this handling commits (a durable timer: it is
        in the outbox and survives restarts). Its type must be declared in ``emits``."""
        self.later.append((event, max(0.0, delay)))
