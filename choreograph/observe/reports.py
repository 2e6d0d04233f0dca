"""Checking what the recorder is about to write: handling reports, heartbeats and event data.

Reports and events come from other processes (or from anyone who can publish on the bus), so every
field is checked and bounded before it reaches the database: a report with ``attempt: 1e30``, a
string where a number belongs or event data nested too deep to serialise is refused here with a
reason (:class:`Unrecordable`), never by the database in the middle of a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

#: Longest text kept from a report's free-text fields (errors, notes).
MAX_TEXT = 8000
#: Longest identifier kept (ids, types, names).
MAX_NAME = 500
#: Most emitted events or timer changes kept from one report.
MAX_ITEMS = 1000
_OUTCOMES = frozenset({"done", "duplicate", "retry", "dead_letter", "ignored", "late"})
#: Seconds since the epoch that a report may carry: from 2001 to 2286.
_EPOCH_RANGE = (1e9, 1e10)


class Unrecordable(ValueError):
    """A report or event the recorder refuses, with the reason."""


@dataclass(frozen=True, slots=True)
class TimerNote:
    action: str
    name: str | None
    key: str
    due_at: float | None


@dataclass(frozen=True, slots=True)
class HandlingRow:
    """One checked handling report, in the column order of ``cg_handlings``."""

    id: str
    event_id: str
    event_type: str
    correlation_id: str
    service: str
    handler: str
    kind: str
    attempt: int
    outcome: str
    delay: float | None
    reason: str | None
    error_type: str | None
    error: str | None
    note: str | None
    emitted: str
    traceback: str | None
    started: float
    ended: float
    timers: tuple[TimerNote, ...]
    timer: str | None

    def columns(self) -> tuple[Any, ...]:
        return (
            self.id, self.event_id, self.event_type, self.correlation_id, self.service,
            self.handler, self.kind, self.attempt, self.outcome, self.delay, self.reason,
            self.error_type, self.error, self.note, self.emitted, self.started, self.ended,
            self.traceback,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Heartbeat:
    replica: str
    host: str
    pid: int
    services: tuple[str, ...]
    started: float
    at: float


def handling_row(report: Any) -> HandlingRow:
    """The report as a row, or :class:`Unrecordable` saying which field is wrong."""
    if not isinstance(report, dict):
        raise Unrecordable(f"a report must be an object, not {type(report).__name__}")
    emitted = [
        {"id": _name(e, "id"), "type": _name(e, "type")}
        for e in _items(report.get("emitted"), "emitted")
    ]
    outcome = _name(report, "outcome")
    if outcome not in _OUTCOMES:
        raise Unrecordable(f"unknown outcome {outcome[:50]!r}")
    return HandlingRow(
        id=_name(report, "id"),
        event_id=_name(report, "event_id"),
        event_type=_name(report, "event_type"),
        correlation_id=_name(report, "correlation_id"),
        service=_name(report, "service"),
        handler=_name(report, "handler", ""),
        kind=_name(report, "kind", "handler"),
        attempt=_count(report.get("attempt", 1), "attempt"),
        outcome=outcome,
        delay=_seconds(report.get("delay"), "delay"),
        reason=_text(report.get("reason"), "reason"),
        error_type=_text(report.get("error_type"), "error_type"),
        error=_text(report.get("error"), "error"),
        note=_text(report.get("note"), "note"),
        emitted=orjson.dumps(emitted).decode(),
        traceback=_text(report.get("traceback"), "traceback"),
        started=_epoch(report.get("started"), "started"),
        ended=_epoch(report.get("ended"), "ended"),
        timers=tuple(_timer(t) for t in _items(report.get("timers"), "timers")),
        timer=_text(report.get("timer"), "timer"),
    )


def heartbeat(doc: Any) -> Heartbeat:
    if not isinstance(doc, dict):
        raise Unrecordable("a heartbeat must be an object")
    services = tuple(str(s)[:MAX_NAME] for s in _items(doc.get("services"), "services"))
    return Heartbeat(
        replica=_name(doc, "replica"),
        host=_name(doc, "host", "?"),
        pid=_count(doc.get("pid", 0), "pid"),
        services=services,
        started=_epoch(doc.get("started"), "started"),
        at=_epoch(doc.get("at"), "at"),
    )


def data_text(data: Any) -> str:
    """An event's data as JSON text; data that cannot be serialised (nested too deep, integers
    past 64 bits) is replaced by a note saying so: the event itself is still recorded."""
    try:
        return orjson.dumps(data).decode()
    except (TypeError, orjson.JSONEncodeError) as exc:
        return orjson.dumps({"_unrecorded": f"data not recordable: {exc}"[:MAX_TEXT]}).decode()


def business_keys(data: Any) -> list[tuple[str, str]]:
    """The identifying fields of an event's data, as ``(name, value)``: top-level strings and
    integers whose names end in ``id`` (``delivery_id``, ``orderId``). What a search can find."""
    if not isinstance(data, dict):
        return []
    found = []
    for name, value in data.items():
        if not isinstance(name, str) or not name.lower().endswith("id") or len(name) > 100:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int):
            continue
        text = str(value)
        if 0 < len(text) <= 200:
            found.append((name, text))
    return found[:20]


def _timer(doc: Any) -> TimerNote:
    if not isinstance(doc, dict):
        raise Unrecordable("a timer change must be an object")
    action = _name(doc, "action")
    if action not in ("set", "cancel"):
        raise Unrecordable(f"unknown timer action {action[:50]!r}")
    due = doc.get("due_at")
    return TimerNote(
        action,
        _text(doc.get("name"), "timer name"),
        _name(doc, "key"),
        None if due is None else _epoch(due, "due_at"),
    )


def _items(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Unrecordable(f"{field} must be a list")
    if len(value) > MAX_ITEMS:
        raise Unrecordable(f"{field} has {len(value)} items (at most {MAX_ITEMS})")
    return value


def _name(doc: Any, field: str, default: str | None = None) -> str:
    value = doc.get(field, default) if isinstance(doc, dict) else None
    if value is None or (value == "" and default is None):
        raise Unrecordable(f"{field} is missing")
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise Unrecordable(f"{field} must be a string")
    return _clean(str(value))[:MAX_NAME]


def _text(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise Unrecordable(f"{field} must be text")
    return _clean(str(value))[:MAX_TEXT]


def _clean(text: str) -> str:
    # PostgreSQL refuses NUL in text; surrogates cannot be encoded for either database.
    return text.replace("\x00", "\\0").encode("utf-8", "replace").decode()


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unrecordable(f"{field} must be a number")
    if not math.isfinite(value) or not 0 <= value < 2**31 or value != int(value):
        raise Unrecordable(f"{field} {value!r} is out of range")
    return int(value)


def _seconds(value: Any, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unrecordable(f"{field} must be a number")
    if not math.isfinite(value) or not 0 <= value <= 1e9:
        raise Unrecordable(f"{field} {value!r} is out of range")
    return float(value)


def _epoch(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unrecordable(f"{field} must be a time (epoch seconds)")
    if not math.isfinite(value) or not _EPOCH_RANGE[0] <= value <= _EPOCH_RANGE[1]:
        raise Unrecordable(f"{field} {value!r} is not a plausible time")
    return float(value)
