"""The service stores a W3 run uses: SQLite files in its scratch directory, or PostgreSQL
schemas of its own (one per service and per run) in the shared database, dropped afterwards."""

from __future__ import annotations

import os
from pathlib import Path

#: The PostgreSQL database the benchmarks use (trust authentication on this machine).
PG_URL = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
STORES = ("sqlite", "postgres")
#: The PostgreSQL store's URL option that chooses how transactions of a service lock
#: (per key by default; ``service`` for the former per-service lock).
LOCKING_OPTION = "locking"


def store_template(kind: str, workdir: Path, namespace: str, locking: str = "") -> str:
    """A ``{service}`` store URL template; ``locking`` ('' for the store's default) only
    applies to PostgreSQL."""
    if kind == "sqlite":
        return f"sqlite:///{workdir}/{{service}}.db"
    if kind != "postgres":
        raise ValueError(f"unknown store {kind!r}: use one of {', '.join(STORES)}")
    option = f"&{LOCKING_OPTION}={locking}" if locking else ""
    return f"{PG_URL}?schema={namespace}_{{service}}{option}"


async def drop_stores(kind: str, namespace: str) -> None:
    """Drop the PostgreSQL schemas of a run (those named ``{namespace}_...``)."""
    if kind != "postgres":
        return
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(PG_URL)
    try:
        names = await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)", f"{namespace}_"
        )
        for row in names:
            await conn.execute(f'DROP SCHEMA "{row["nspname"]}" CASCADE')
    finally:
        await conn.close()
