"""Reading the recorder's database: one transaction, stuck ones, and counts.

:func:`load_transaction` returns a transaction as plain data (JSON-ready): its events in causation
order, each with its handlings, and, when the app is given, the *declared* flow overlaid: for each
event, which steps the declarations expect after it, which happened, which are pending, and which
deadlines are open. That overlay is what ``choreograph trace`` shows as "where it is stuck".
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson

from choreograph.observe.flowdb import FlowDb
from choreograph.observe.model import FlowModel, Step, is_failure_type

Row = dict[str, Any]


def status_of(summary: Row) -> str:
    """``completed``, ``failed`` (a terminal failure event) or ``in_flight``."""
    terminal = summary.get("terminal_type")
    if not terminal:
        return "in_flight"
    return "failed" if is_failure_type(terminal) else "completed"


async def load_transaction(
    db: FlowDb, correlation_id: str, model: FlowModel | None = None, *, now: float | None = None
) -> Row | None:
    """The transaction ``correlation_id``, or None when the recorder never saw it."""
    now = time.time() if now is None else now
    summaries = await db.fetch(
        "SELECT * FROM cg_transactions WHERE correlation_id = ?", (correlation_id,)
    )
    if not summaries:
        return None
    summary = summaries[0]
    events = await db.fetch(
        "SELECT id, type, source, causation_id, time, traceparent, data FROM cg_events "
        "WHERE correlation_id = ? ORDER BY time, recorded_at",
        (correlation_id,),
    )
    handlings = await db.fetch(
        "SELECT * FROM cg_handlings WHERE correlation_id = ? ORDER BY started, attempt",
        (correlation_id,),
    )
    timers = await db.fetch(
        "SELECT * FROM cg_timers WHERE correlation_id = ? ORDER BY set_at", (correlation_id,)
    )
    # Services known to report: those that sent a heartbeat (a small table) and those that
    # reported a handling of this transaction; never a scan of every handling ever recorded.
    reporting = {r["service"] for r in await db.fetch("SELECT DISTINCT service FROM cg_heartbeats")}
    reporting |= {h["service"] for h in handlings}
    for event in events:
        event["data"] = orjson.loads(event["data"])
        event["handlings"] = []
    for handling in handlings:
        handling["emitted"] = orjson.loads(handling["emitted"])
        handling["duration"] = round(handling["ended"] - handling["started"], 6)
    by_id = {e["id"]: e for e in events}
    orphans = []
    for handling in handlings:
        if handling["event_id"] in by_id:
            by_id[handling["event_id"]]["handlings"].append(handling)
        else:
            orphans.append(handling)  # its event was published before the recorder started
    status = status_of(summary)
    ended = summary["ended_at"]
    view: Row = {
        "correlation_id": correlation_id,
        "status": status,
        "terminal": summary["terminal_type"],
        "started": summary["first_seen"],
        "ended": ended,
        "duration": round((ended or summary["last_seen"]) - summary["first_seen"], 6),
        "age": round(now - summary["first_seen"], 3),
        "counts": {
            k: summary[k]
            for k in ("events", "failures", "retries", "dead_letters", "compensations")
        },
        "events": events,
        "timers": timers,
        "late": summary.get("late") or 0,
        "unmatched_handlings": orphans,
        "roots": _roots(events),
    }
    if model is not None:
        view["expected"] = expectations(model, events, ended is not None, reporting, now, timers)
        view["stuck_at"] = [x for x in view["expected"] if x["blocking"]] if not ended else []
    return view


def _roots(events: list[Row]) -> list[str]:
    ids = {e["id"] for e in events}
    return [e["id"] for e in events if not e["causation_id"] or e["causation_id"] not in ids]


def children(events: list[Row], parent: Row) -> list[Row]:
    return [e for e in events if e["causation_id"] == parent["id"] and e["id"] != parent["id"]]


# the declared flow, overlaid ---------------------------------------------------------------------


def expectations(
    model: FlowModel,
    events: list[Row],
    ended: bool,
    reporting: set[str],
    now: float,
    timers: Sequence[Row] = (),
) -> list[Row]:
    """What the declarations expect after each recorded event, and how far each got.

    ``status`` is one of ``done``, ``ignored``, ``late`` (its transaction had ended),
    ``duplicate``, ``retrying``, ``dead_lettered``, ``pending`` (no handling reported yet),
    ``unknown`` (that service reports nothing: no RecorderMiddleware), ``waiting`` (a join
    missing parts), ``silent`` (handled, but emitted none of the events it declares),
    ``external`` (a participant the app does not run: it never reports; never blocking), and for
    timers ``open``, ``overdue``, ``met``, ``expired``,
    ``cancelled``; ``incomplete`` is a join that never completed in an ended transaction.
    ``blocking`` marks what keeps an unfinished transaction from ending. A timer's due time is
    the one its service reported when it set it (``timers``, from the recorder); only a timer set
    by a service that does not report is estimated from the declarations (``estimated``).
    """
    found: list[Row] = []
    seen_types = {e["type"] for e in events}
    for event in events:
        for step in model.reactions(event["type"]):
            found.append(_reaction(step, event, events, ended, reporting))
        for step in model.deadlines_started_by(event["type"]):
            found.append(_timer(step, event, events, ended, now, step.expect, timers))
        for step in model.join_timeouts_started_by(event["type"]):
            if not any(x["kind"] == "join_timeout" and x["step"] == step.name for x in found):
                join = model.step(step.service, step.name, "join")
                emits = join.emits if join else ()
                found.append(_timer(step, event, events, ended, now, emits, timers))
    for step in model.steps:
        if step.kind == "join" and seen_types & set(step.triggers):
            missing = [t for t in step.triggers if t not in seen_types]
            if missing:
                found.append(
                    {
                        "after": None,
                        "event_type": None,
                        "service": step.service,
                        "step": step.name,
                        "kind": "join",
                        "status": "incomplete" if ended else "waiting",
                        "detail": f"has {', '.join(t for t in step.triggers if t in seen_types)}; "
                        f"waiting for {', '.join(missing)}",
                        "blocking": not ended,
                    }
                )
    return found


def _reaction(step: Step, event: Row, events: list[Row], ended: bool, reporting: set[str]) -> Row:
    mine = [h for h in event["handlings"] if h["service"] == step.service]
    row: Row = {
        "after": event["id"],
        "event_type": event["type"],
        "service": step.service,
        "step": step.name,
        "kind": step.kind,
        "attempts": len([h for h in mine if h["outcome"] != "duplicate"]),
    }
    effective = [h for h in mine if h["outcome"] != "duplicate"] or mine
    last = effective[-1] if effective else None
    if step.kind == "external" and last is None:
        # the app does not run it: it reports nothing, and what it emits shows in the flow
        answered = [e["type"] for e in events if e["causation_id"] == event["id"]
                    and e["type"] in step.emits]  # fmt: skip
        row["status"] = "external"
        row["detail"] = (
            f"emitted {', '.join(answered)}" if answered else "runs outside this app; no reports"
        )
        row["blocking"] = False
        return row
    if last is None:
        status = "pending" if step.service in reporting else "unknown"
        detail = "not handled yet" if status == "pending" else "no reports from this service"
    elif last["outcome"] == "retry":
        status = "retrying"
        detail = (
            f"attempt {last['attempt']} failed ({last['error_type']}: {last['error']}); "
            f"next in {last['delay'] or 0:.3g}s"
        )
    elif last["outcome"] == "dead_letter":
        status, detail = "dead_lettered", f"{last['reason']}: {last['error_type']}: {last['error']}"
    elif last["outcome"] in ("ignored", "duplicate", "late"):
        status, detail = last["outcome"], last["note"] or ""
    else:
        emitted = [e["type"] for e in last["emitted"]]
        status, detail = "done", ("emitted " + ", ".join(emitted)) if emitted else "emitted nothing"
        # An ordinary handler that declares outputs but sent none leaves the flow hanging here,
        # unless a delayed emission of it has arrived since (emit_later).
        later = [
            e
            for e in events
            if e["causation_id"] == event["id"]
            and e["type"] in step.emits
            and e["id"] not in {x["id"] for x in last["emitted"]}
        ]
        if step.kind == "handler" and step.emits and not emitted and not later:
            status = "silent"
            detail = f"emitted none of {', '.join(step.emits)}"
    row["status"], row["detail"] = status, detail
    row["blocking"] = not ended and status in (
        "pending",
        "unknown",
        "retrying",
        "dead_lettered",
        "silent",
    )
    return row


def _timer(
    step: Step,
    event: Row,
    events: list[Row],
    ended: bool,
    now: float,
    expect: tuple[str, ...],
    timers: Sequence[Row],
) -> Row:
    assert step.within is not None
    name = f"{'deadline' if step.kind == 'deadline' else 'join'}:{step.name}"
    recorded = [t for t in timers if t["service"] == step.service and t["name"] == name]
    # The latest setting counts: a retried timer is set again with a later due time.
    real = recorded[-1] if recorded else None
    due = real["due_at"] if real else event["time"] + step.within
    fired = [
        h
        for e in events
        for h in e["handlings"]
        if h["kind"] == step.kind and h["handler"] == step.name and h["service"] == step.service
    ]
    met = any(e["type"] in expect and e["time"] >= event["time"] for e in events)
    if fired or (real and real["status"] == "fired"):
        waited = (real["due_at"] - real["set_at"]) if real else step.within
        status, detail = "expired", f"fired after {waited:g}s"
    elif real and real["status"] == "cancelled" and not met:
        status, detail = "cancelled", "cancelled by the service"
    elif met:
        status, detail = "met", f"{' or '.join(expect)} arrived in time"
    elif ended:
        status, detail = "cancelled", "the transaction ended first"
    elif now > due:
        status, detail = "overdue", f"was due {now - due:.1f}s ago (is the service running?)"
    else:
        status, detail = "open", f"expires in {due - now:.1f}s unless {' or '.join(expect)}"
    if real is None and status in ("open", "overdue"):
        detail += " (estimated from the declarations: the service reports no timers)"
    return {
        "after": event["id"],
        "event_type": event["type"],
        "service": step.service,
        "step": step.name,
        "kind": step.kind,
        "status": status,
        "detail": detail,
        "due": due,
        "estimated": real is None,
        "blocking": status in ("open", "overdue") and not ended,
    }


# lists and counts --------------------------------------------------------------------------------


async def stuck_transactions(
    db: FlowDb,
    older_than: float,
    *,
    model: FlowModel | None = None,
    now: float | None = None,
    limit: int = 100,
) -> list[Row]:
    """Transactions with no terminal event, started more than ``older_than`` seconds ago,
    oldest first; with ``model``, each says what it is waiting for."""
    now = time.time() if now is None else now
    rows = await db.fetch(
        "SELECT * FROM cg_transactions WHERE ended_at IS NULL AND first_seen < ? "
        "ORDER BY first_seen LIMIT ?",
        (now - older_than, limit),
    )
    for row in rows:
        row["age"] = round(now - row["first_seen"], 3)
        row["idle"] = round(now - row["last_seen"], 3)
        if model is not None:
            view = await load_transaction(db, row["correlation_id"], model, now=now)
            stuck = view["stuck_at"] if view else []
            row["waiting_for"] = [
                f"{x['service']}.{x['step']} ({x['status']}: {x['detail']})" for x in stuck
            ]
    return rows


async def flow_stats(db: FlowDb, *, stuck_after: float = 30.0, now: float | None = None) -> Row:
    """Counts of transactions by status, and of handlings by service and outcome."""
    now = time.time() if now is None else now
    transactions = {
        "total": 0,
        "completed": 0,
        "failed": 0,
        "in_flight": 0,
        "stuck": 0,
        "with_retries": 0,
        "with_dead_letters": 0,
        "compensated": 0,
    }
    rows = await db.fetch(
        "SELECT terminal_type, COUNT(*) AS n, "
        "SUM(CASE WHEN ended_at IS NULL AND first_seen < ? THEN 1 ELSE 0 END) AS stuck, "
        "SUM(CASE WHEN retries > 0 THEN 1 ELSE 0 END) AS with_retries, "
        "SUM(CASE WHEN dead_letters > 0 THEN 1 ELSE 0 END) AS with_dead_letters, "
        "SUM(CASE WHEN compensations > 0 THEN 1 ELSE 0 END) AS compensated "
        "FROM cg_transactions GROUP BY terminal_type",
        (now - stuck_after,),
    )
    by_terminal: dict[str, int] = {}
    for row in rows:
        transactions["total"] += row["n"]
        transactions[status_of(row)] += row["n"]
        for key in ("stuck", "with_retries", "with_dead_letters", "compensated"):
            transactions[key] += int(row[key] or 0)
        if row["terminal_type"]:
            by_terminal[row["terminal_type"]] = row["n"]
    services: dict[str, Row] = {}
    for row in await db.fetch(
        "SELECT service, kind, outcome, COUNT(*) AS n, AVG(ended - started) AS avg_s, "
        "MAX(ended - started) AS max_s FROM cg_handlings GROUP BY service, kind, outcome"
    ):
        entry = services.setdefault(
            row["service"],
            {
                "done": 0,
                "duplicate": 0,
                "ignored": 0,
                "late": 0,
                "retry": 0,
                "dead_letter": 0,
                "compensations": 0,
                "timers": 0,
                "avg_ms": 0.0,
                "max_ms": 0.0,
                "_n": 0,
            },
        )
        entry[row["outcome"]] = entry.get(row["outcome"], 0) + row["n"]
        if row["kind"] == "compensation" and row["outcome"] == "done":
            entry["compensations"] += row["n"]
        if row["kind"] in ("deadline", "join_timeout"):
            entry["timers"] += row["n"]
        if row["outcome"] in ("done", "ignored", "retry", "dead_letter"):
            total = entry["_n"] + row["n"]
            entry["avg_ms"] = (
                entry["avg_ms"] * entry["_n"] + (row["avg_s"] or 0) * 1000 * row["n"]
            ) / total
            entry["_n"] = total
            entry["max_ms"] = max(entry["max_ms"], (row["max_s"] or 0) * 1000)
    for entry in services.values():
        entry.pop("_n")
        entry["avg_ms"] = round(entry["avg_ms"], 3)
        entry["max_ms"] = round(entry["max_ms"], 3)
    events = {
        r["type"]: r["n"]
        for r in await db.fetch(
            "SELECT type, COUNT(*) AS n FROM cg_events GROUP BY type ORDER BY type"
        )
    }
    return {
        "transactions": transactions,
        "terminal": by_terminal,
        "services": services,
        "events": events,
        "stuck_after": stuck_after,
    }
