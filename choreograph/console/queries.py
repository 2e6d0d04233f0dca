"""The console's questions to the recorder database, each one or two indexed queries.

Everything here is read-only except :func:`record_action` (the audit of replays and discards).
Times are epoch seconds; a *window* is how far back counts go.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from choreograph.envelope import new_id
from choreograph.observe.flowdb import FlowDb

Row = dict[str, Any]

STATUSES = ("in_flight", "completed", "failed", "stuck", "late")
SORTS = {
    "started": "t.first_seen",
    "last": "t.last_seen",
    "events": "t.events",
    "retries": "t.retries",
    "dead_letters": "t.dead_letters",
    "id": "t.correlation_id",
}
PAGE_SIZE = 50
#: From this many events of a type, a search by that type walks the list (see ``_had_type``).
COMMON_TYPE = 5000
#: Heartbeats are sent every 5 s; a replica silent for 3 of them counts as gone.
ALIVE_FOR = 15.0


class BadFilter(ValueError):
    """A search parameter that makes no sense, with a message for the page."""


@dataclass(frozen=True, slots=True)
class TxFilter:
    """A search of the transaction list. Empty fields do not filter."""

    q: str = ""
    """A correlation id (or its beginning), or the value of an identifying data field."""
    event_type: str = ""
    field_name: str = ""
    field_value: str = ""
    status: str = ""
    since: float | None = None
    until: float | None = None
    sort: str = "started"
    descending: bool = True
    page: int = 1

    @classmethod
    def from_params(cls, params: dict[str, str]) -> TxFilter:
        """From a query string; :class:`BadFilter` for a value that cannot be used."""
        status = params.get("status", "").strip()
        if status and status not in STATUSES:
            raise BadFilter(f"unknown status {status[:40]!r}; use one of {', '.join(STATUSES)}")
        sort = params.get("sort", "started").strip() or "started"
        if sort not in SORTS:
            raise BadFilter(f"cannot sort by {sort[:40]!r}; use one of {', '.join(SORTS)}")
        name, _, value = params.get("field", "").partition("=")
        if params.get("field", "").strip() and not (name.strip() and value.strip()):
            raise BadFilter("a data field search looks like delivery_id=d-000042")
        try:
            page = int(params.get("page", "1") or 1)
        except ValueError:
            raise BadFilter("page must be a number") from None
        if not 1 <= page <= 100_000:
            raise BadFilter("page must be between 1 and 100000")
        return cls(
            q=params.get("q", "").strip()[:500],
            event_type=params.get("type", "").strip()[:500],
            field_name=name.strip()[:100],
            field_value=value.strip()[:500],
            status=status,
            since=parse_time(params.get("from", ""), "from"),
            until=parse_time(params.get("to", ""), "to"),
            sort=sort,
            descending=params.get("dir", "desc") != "asc",
            page=page,
        )

    def params(self, **changes: Any) -> dict[str, str]:
        """This search as query parameters (for links: next page, another sort)."""
        values = {
            "q": self.q,
            "type": self.event_type,
            "field": f"{self.field_name}={self.field_value}" if self.field_name else "",
            "status": self.status,
            "from": format_time(self.since),
            "to": format_time(self.until),
            "sort": self.sort,
            "dir": "desc" if self.descending else "asc",
            "page": str(self.page),
        }
        values.update({k: str(v) for k, v in changes.items()})
        return {k: v for k, v in values.items() if v and not (k == "page" and v == "1")}


def parse_time(text: str, name: str) -> float | None:
    """``2026-01-31T12:00`` (a browser's datetime-local, read as UTC) or epoch seconds."""
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadFilter(f"{name}: {text[:40]!r} is not a time (2026-01-31T12:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_time(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M")


@dataclass(slots=True)
class TxPage:
    rows: list[Row]
    more: bool
    filter: TxFilter
    took_ms: float = 0.0
    errors: list[str] = field(default_factory=list)


async def search_transactions(
    db: FlowDb, f: TxFilter, *, now: float | None = None, stuck_after: float = 60.0
) -> TxPage:
    """One page of transactions matching ``f``, in its order; ``more`` when another follows."""
    now = time.time() if now is None else now
    started = time.perf_counter()
    where: list[str] = []
    params: list[Any] = []
    if f.q:
        if db.dialect == "sqlite":  # binary collation: a prefix is an index range
            prefix, prefix_params = (
                "t.correlation_id >= ? AND t.correlation_id < ?",
                [
                    f.q,
                    f.q + "\U0010ffff",
                ],
            )
        else:
            prefix, prefix_params = "starts_with(t.correlation_id, ?)", [f.q]
        where.append(
            f"(t.correlation_id = ? OR {prefix} OR t.correlation_id IN "
            "(SELECT correlation_id FROM cg_keys WHERE value = ?))"
        )
        params += [f.q, *prefix_params, f.q]
    if f.event_type:
        where.append(await _had_type(db, f.event_type, narrowed=bool(f.q or f.field_name)))
        params.append(f.event_type)
    if f.field_name:
        where.append(
            "t.correlation_id IN (SELECT correlation_id FROM cg_keys WHERE value = ? AND name = ?)"
        )
        params += [f.field_value, f.field_name]
    if f.status == "completed":
        where.append("t.outcome = 'completed'")
    elif f.status == "failed":
        where.append("t.outcome = 'failed'")
    elif f.status == "in_flight":
        where.append("t.outcome IS NULL")
    elif f.status == "stuck":
        where.append("t.outcome IS NULL AND t.last_seen < ?")
        params.append(now - stuck_after)
    elif f.status == "late":
        where.append("t.late > 0")
    if f.since is not None:
        where.append("t.first_seen >= ?")
        params.append(f.since)
    if f.until is not None:
        where.append("t.first_seen <= ?")
        params.append(f.until)
    order = f"{SORTS[f.sort]} {'DESC' if f.descending else 'ASC'}"
    tie = "t.correlation_id DESC" if f.descending else "t.correlation_id ASC"
    sql = (
        "SELECT t.* FROM cg_transactions t"
        + (" WHERE " + " AND ".join(where) if where else "")
        + f" ORDER BY {order}, {tie} LIMIT ? OFFSET ?"
    )
    params += [PAGE_SIZE + 1, (f.page - 1) * PAGE_SIZE]
    rows = await db.fetch(sql, params)
    for row in rows:
        row["status"] = status_of(row, now, stuck_after)
        row["duration"] = (row["ended_at"] or row["last_seen"]) - row["first_seen"]
    took = (time.perf_counter() - started) * 1000
    return TxPage(rows[:PAGE_SIZE], len(rows) > PAGE_SIZE, f, took)


async def _had_type(db: FlowDb, event_type: str, *, narrowed: bool) -> str:
    """The condition "the transaction had an event of this type", in the form that reads least.

    A rare type: read its few transactions (index on type) and sort them. A common one (at least
    :data:`COMMON_TYPE` events): walk the list in its order and check each transaction, which
    stops after a page; reading all of them would cost 270 ms for a type every one of 174,000
    transactions had, against 0.1 ms (SQLite, benchmarks/console.py). A search by id or data
    field is narrow already: its few transactions are checked."""
    if not narrowed:
        rows = await db.fetch(
            "SELECT COUNT(*) AS n FROM (SELECT 1 FROM cg_events WHERE type = ? LIMIT ?) c",
            (event_type, COMMON_TYPE),
        )
        if int(rows[0]["n"]) >= COMMON_TYPE:
            return (
                "EXISTS (SELECT 1 FROM cg_events e "
                "WHERE e.correlation_id = t.correlation_id AND e.type = ?)"
            )
    return "t.correlation_id IN (SELECT correlation_id FROM cg_events WHERE type = ?)"


def status_of(row: Row, now: float, stuck_after: float) -> str:
    """``completed``, ``failed``, ``in_flight`` or ``stuck`` (in flight, silent too long)."""
    outcome = row.get("outcome")
    if outcome:
        return str(outcome)
    return "stuck" if now - row["last_seen"] > stuck_after else "in_flight"


# the overview ------------------------------------------------------------------------------------


async def transaction_counts(
    db: FlowDb, since: float, *, now: float | None = None, stuck_after: float = 60.0
) -> dict[str, int]:
    """Transactions started since ``since``, by status (plus ``late`` and ``total``); three
    index-only counts."""
    now = time.time() if now is None else now
    counts = dict.fromkeys(("total", "in_flight", "stuck", "completed", "failed", "late"), 0)
    for row in await db.fetch(
        "SELECT outcome, COUNT(*) AS n FROM cg_transactions WHERE first_seen >= ? GROUP BY outcome",
        (since,),
    ):
        counts["total"] += int(row["n"])
        counts[row["outcome"] or "in_flight"] += int(row["n"])
    stuck = await db.fetch(
        "SELECT COUNT(*) AS n FROM cg_transactions WHERE outcome IS NULL AND first_seen >= ? "
        "AND last_seen < ?",
        (since, now - stuck_after),
    )
    counts["stuck"] = int(stuck[0]["n"])
    counts["in_flight"] -= counts["stuck"]
    late = await db.fetch(
        "SELECT COUNT(*) AS n FROM cg_transactions WHERE late > 0 AND first_seen >= ?", (since,)
    )
    counts["late"] = int(late[0]["n"])
    return counts


async def service_activity(
    db: FlowDb, since: float, *, now: float | None = None, buckets: int = 40
) -> dict[str, Row]:
    """Per service since ``since``: handlings by outcome, handled per second over the last
    minute, and a series of handlings per bucket (for a sparkline: ``series_step`` seconds each
    from ``series_from``). Read from the per-minute
    counts (``cg_rollup``), so a window of days costs no more than one of minutes."""
    now = time.time() if now is None else now
    services: dict[str, Row] = {}

    def entry(name: str) -> Row:
        return services.setdefault(
            name,
            {"done": 0, "retry": 0, "dead_letter": 0, "ignored": 0, "duplicate": 0, "late": 0,
             "compensations": 0, "per_second": 0.0, "series": [0] * count,
             "series_from": start * 60.0, "series_step": width * 60.0},
        )  # fmt: skip

    first = int(since // 60) if math.isfinite(since) else 0
    # MIN and MAX each in its own subquery: each is then one index probe, not a scan
    span = await db.fetch(
        "SELECT (SELECT MIN(minute) FROM cg_rollup WHERE kind = 'handling' AND minute >= ?) AS lo,"
        " (SELECT MAX(minute) FROM cg_rollup WHERE kind = 'handling' AND minute >= ?) AS hi",
        (first, first),
    )
    if not span or span[0]["lo"] is None:
        return services
    # The series spans the activity inside the window (a run that ended an hour ago still shows
    # its shape), up to now while the system is busy; a span shorter than ``buckets`` minutes
    # has a bucket per minute (no empty buckets after the last minute).
    start, end = int(span[0]["lo"]), int(span[0]["hi"]) + 1
    if now / 60 - end < 1.0:
        end = int(now // 60) + 1
    width = max(1, math.ceil((end - start) / buckets))  # whole minutes: integer division in SQL
    count = math.ceil((end - start) / width)
    last_minute = int(now // 60) - 1
    recent: dict[str, int] = {}
    # one pass over the window's counts: totals and the series together
    for row in await db.fetch(
        "SELECT a, b, (minute - ?) / ? AS bucket, SUM(n) AS n, "
        "SUM(CASE WHEN minute = ? THEN n ELSE 0 END) AS recent "
        "FROM cg_rollup WHERE kind = 'handling' AND minute >= ? GROUP BY a, b, bucket",
        (start, width, last_minute, first),
    ):
        item = entry(row["a"])
        outcome, _, kind = str(row["b"]).partition("/")
        n = int(row["n"])
        item[outcome] = item.get(outcome, 0) + n
        if kind == "compensation" and outcome == "done":
            item["compensations"] += n
        if outcome == "done":
            recent[row["a"]] = recent.get(row["a"], 0) + int(row["recent"])
        item["series"][min(max(int(row["bucket"]), 0), count - 1)] += n
    for name, n in recent.items():
        services[name]["per_second"] = round(n / 60.0, 2)
    return services


async def replicas(db: FlowDb, *, now: float | None = None) -> dict[str, list[Row]]:
    """The replicas of each service that sent a heartbeat recently."""
    now = time.time() if now is None else now
    found: dict[str, list[Row]] = {}
    for row in await db.fetch(
        "SELECT * FROM cg_heartbeats WHERE last_seen >= ? ORDER BY service, host, pid",
        (now - ALIVE_FOR,),
    ):
        found.setdefault(row["service"], []).append(row)
    return found


async def data_window(db: FlowDb) -> tuple[float, float] | None:
    """When the first and the latest recorded transactions started."""
    rows = await db.fetch(
        "SELECT (SELECT MIN(first_seen) FROM cg_transactions) AS lo, "
        "(SELECT MAX(first_seen) FROM cg_transactions) AS hi"
    )
    if not rows or rows[0]["lo"] is None:
        return None
    return float(rows[0]["lo"]), float(rows[0]["hi"])


async def edge_counts(db: FlowDb, since: float) -> dict[tuple[str, str], int]:
    """How often each service handled each event type (``(event type, service)``) and published
    each event type (``(service, event type)``) since ``since``, from the per-minute counts."""
    first = int(since // 60) if math.isfinite(since) else 0
    rows = await db.fetch(
        "SELECT a, b, SUM(n) AS n FROM cg_rollup WHERE kind = 'edge' AND minute >= ? GROUP BY a, b",
        (first,),
    )
    return {(r["a"], r["b"]): int(r["n"]) for r in rows}


async def rejects(db: FlowDb, limit: int = 20) -> list[Row]:
    return await db.fetch("SELECT * FROM cg_rejects ORDER BY at DESC LIMIT ?", (limit,))


# actions -----------------------------------------------------------------------------------------


async def record_action(
    db: FlowDb,
    action: str,
    *,
    correlation_id: str,
    event_id: str,
    event_type: str,
    group: str,
    edited: bool,
    result: str,
) -> None:
    async with db.transaction() as tx:
        await tx.execute(
            "INSERT INTO cg_actions (id, at, action, correlation_id, event_id, event_type, grp, "
            "edited, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (new_id(), time.time(), action, correlation_id, event_id, event_type, group,
             int(edited), result),
        )  # fmt: skip


async def actions_of(db: FlowDb, correlation_id: str) -> list[Row]:
    return await db.fetch(
        "SELECT * FROM cg_actions WHERE correlation_id = ? ORDER BY at", (correlation_id,)
    )


def window_seconds(text: str) -> float:
    """``15m``, ``1h``, ``24h``, ``7d`` or ``all``."""
    table = {"15m": 900.0, "1h": 3600.0, "24h": 86_400.0, "7d": 604_800.0, "all": math.inf}
    if text not in table:
        raise BadFilter(f"unknown window {text[:20]!r}; use one of {', '.join(table)}")
    return table[text]
