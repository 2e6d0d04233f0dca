"""A service whose side effects can be counted, and a middleware that kills its own process at a
chosen point of the handling path (env CRASH_AT=handled|committed|published, CRASH_ON_BATCH=N).

``LEDGER_WRITES`` says where the handler applies an addition: ``state`` (a document, the
default), or a row of its own ``entries`` table written through ``connection`` (the store
transaction's driver connection, plain SQL) or ``session`` (SQLAlchemy). Entries have a surrogate
key, so an addition applied twice shows as two rows.
"""

from __future__ import annotations

import os
import signal
import sqlite3

from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from choreograph import App, Context, Event, Middleware, Service
from choreograph.middleware import Checkpoint


class Add(Event):
    account: str
    amount: int


class Added(Event):
    account: str
    amount: int


class LedgerTables(DeclarativeBase):
    pass


class Entry(LedgerTables):
    __tablename__ = "entries"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64))
    account: Mapped[str] = mapped_column(String(64))
    amount: Mapped[int]


async def write_entry(ctx: Context, writes: str, event: Add) -> None:
    values = (ctx.event_id, event.account, event.amount)
    if writes == "session":
        ctx.session.add(Entry(event_id=values[0], account=values[1], amount=values[2]))
    elif isinstance(ctx.connection, sqlite3.Connection):
        ctx.connection.execute(
            "INSERT INTO entries (event_id, account, amount) VALUES (?, ?, ?)", values
        )
    else:
        await ctx.connection.execute(
            "INSERT INTO entries (event_id, account, amount) VALUES ($1, $2, $3)", *values
        )


def build(writes: str) -> Service:
    ledger = Service("ledger", tables=None if writes == "state" else LedgerTables.metadata)

    @ledger.on(Add, emits=[Added])
    async def add(event: Add, ctx: Context) -> Added:
        if writes == "state":
            doc = await ctx.state.get("account", event.account) or {"total": 0, "applied": []}
            doc["total"] += event.amount
            doc["applied"].append(ctx.event_id)  # a side effect applied twice shows here twice
            await ctx.state.put("account", event.account, doc)
        else:
            await write_entry(ctx, writes, event)
        return Added(account=event.account, amount=event.amount)

    return ledger


app = App("ledger", [build(os.environ.get("LEDGER_WRITES", "state"))])


class CrashAt(Middleware):
    """SIGKILL this process when the ``batch``-th batch reaches ``point``."""

    def __init__(self, point: str, batch: int) -> None:
        self.point = point
        self.batch = batch
        self.seen = 0

    def checkpoint(self, service: str, point: Checkpoint) -> None:
        if point != self.point:
            return
        self.seen += 1
        if self.seen >= self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def crash_middleware() -> list[Middleware]:
    point = os.environ.get("CRASH_AT", "")
    return [CrashAt(point, int(os.environ.get("CRASH_ON_BATCH", "2")))] if point else []
