"""A service keeping its entries in a table of its own, written through ``ctx.connection``
(plain driver SQL) or ``ctx.session`` (SQLAlchemy), and emitting an event for each entry."""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import Integer, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from choreograph import App, Context, Event, PermanentFailure, Service


class Base(DeclarativeBase):
    pass


class Entry(Base):
    __tablename__ = "entries"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    amount: Mapped[int] = mapped_column(Integer)


class Add(Event):
    entry: str
    amount: int
    via: str = "session"
    """``session`` or ``connection``."""
    fail: bool = False
    """Fail after writing the row (its write must roll back with the message)."""


class Added(Event):
    entry: str
    amount: int


async def insert_entry(ctx: Context | Any, entry: str, amount: int, via: str) -> None:
    if via == "session":
        ctx.session.add(Entry(id=entry, amount=amount))
    elif isinstance(ctx.connection, sqlite3.Connection):
        ctx.connection.execute("INSERT INTO entries (id, amount) VALUES (?, ?)", (entry, amount))
    else:
        await ctx.connection.execute(
            "INSERT INTO entries (id, amount) VALUES ($1, $2)", entry, amount
        )


ledger = Service("ledger")


@ledger.on(Add, emits=[Added])
async def add(event: Add, ctx: Context) -> Added:
    await insert_entry(ctx, event.entry, event.amount, event.via)
    if event.fail:
        raise PermanentFailure(f"entry {event.entry} refused after its row was written")
    return Added(entry=event.entry, amount=event.amount)


app = App("ledger", [ledger])


async def create_tables(ctx: Any) -> None:
    """Create the service's tables in its store (a unit of work's or a handler's session)."""
    connection = await ctx.session.connection()
    await connection.run_sync(Base.metadata.create_all)


async def entries(ctx: Any) -> dict[str, int]:
    rows = await ctx.session.execute(select(Entry.id, Entry.amount))
    return {entry: amount for entry, amount in rows.all()}
