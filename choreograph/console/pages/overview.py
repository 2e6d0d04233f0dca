"""Overview: per service, replicas alive, throughput, retries, dead letters and lag; transactions
by status in a time window; a sparkline of each service's activity."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

from choreograph.console.html import NONE, esc, notice, seconds, sparkline, table, url, when
from choreograph.console.queries import (
    data_window,
    rejects,
    replicas,
    service_activity,
    transaction_counts,
    window_seconds,
)
from choreograph.console.sources import Unavailable
from choreograph.console.state import ConsoleState

WINDOWS = ("15m", "1h", "24h", "7d", "all")


def window_links(current: str, path: str) -> str:
    links = "".join(
        f'<a href="{url(path, {"window": w})}"{" class=active" if w == current else ""}>{w}</a>'
        for w in WINDOWS
    )
    return f'<div class="segmented" aria-label="time window">{links}</div>'


async def overview_live(state: ConsoleState, window: str) -> str:
    now = time.time()
    span = window_seconds(window)
    bounds = await data_window(state.db)
    if bounds is None:
        return notice(
            "The recorder has recorded nothing yet. Run `choreograph demo`, or run your services "
            "with CHOREOGRAPH_RECORD=1 beside `choreograph record`.",
        )
    since = bounds[0] if math.isinf(span) else now - span
    counts = await transaction_counts(
        state.db, since, now=now, stuck_after=state.settings.stuck_after
    )
    cards = "".join(
        f'<a class="card {key}" href="{_list_link(key)}">'
        f'<span class="n">{counts[key]:,}</span><span class="label">{label}</span></a>'
        for key, label in (
            ("in_flight", "in flight"),
            ("stuck", f"stuck (silent {seconds(state.settings.stuck_after)})"),
            ("failed", "failed"),
            ("completed", "completed"),
            ("late", "with late events"),
            ("total", "started"),
        )
    )
    activity = await service_activity(state.db, since, now=now)
    alive = await replicas(state.db, now=now)
    external = set(state.app.external) if state.app else set()
    names = sorted(
        set(activity) | set(alive) | set(state.app.services if state.app else ()) | external
    )
    letters_by_group: dict[str, int] = {}
    bus_note = ""
    try:
        for letter in await state.sources.letters():
            letters_by_group[letter.letter.group] = letters_by_group.get(letter.letter.group, 0) + 1
    except Unavailable as exc:
        bus_note = notice(str(exc), "warn")
    rows = []
    for name in names:
        item = activity.get(name, {})
        lag = await state.sources.lag(name) if state.sources.transport_url else None
        dead_now = letters_by_group.get(name, 0)
        replica_list = alive.get(name, [])
        replica_text = (
            f'<span class="ok">{len(replica_list)}</span>'
            if replica_list
            else '<span class="muted" title="no heartbeat in the last 15 s">0</span>'
        )
        label = f'<span class="svc">{esc(name)}</span>'
        if name in external:
            # the app does not run it: no heartbeats or reports; its group's lag and dead letters
            # are on the bus all the same
            label += ' <span class="muted">(external)</span>'
            replica_text = '<span class="muted" title="not run by this app">—</span>'
        rows.append(
            [
                label,
                replica_text,
                f"{item.get('per_second', 0.0):g}",
                f"{item.get('done', 0):,}",
                _warn(item.get("retry", 0)),
                _warn(item.get("dead_letter", 0), "bad"),
                f'<a href="{url("/dead-letters", {"group": name})}">{_warn(dead_now, "bad")}</a>',
                NONE if lag is None else f"{lag:,}",
                f"{item.get('compensations', 0):,}",
                sparkline(item.get("series", []), _series_title(item)),
            ]
        )
    services = table(
        ["service", "replicas alive", "handled/s (1 min)", "handled", "retries", "dead-lettered",
         "dead letters now", "group lag", "compensations", "activity"],
        rows,
        empty="no service has reported yet",
    )  # fmt: skip
    skipped = await rejects(state.db, 5)
    reject_block = ""
    if skipped:
        reject_block = "<h2>Reports the recorder skipped</h2>" + table(
            ["when", "reason"], [[when(r["at"]), esc(r["reason"])] for r in skipped]
        )
    return (
        f'<section class="cards">{cards}</section>'
        f'<p class="muted">transactions started {"since " + when(since)} · recorded from '
        f"{when(bounds[0])} to {when(bounds[1])}</p>"
        f"<h2>Services</h2>{bus_note}{services}{reject_block}"
    )


def _series_title(item: dict[str, Any]) -> str:
    if not item.get("series"):
        return ""
    step, start = item["series_step"], item["series_from"]
    end = start + step * len(item["series"])
    minutes = f"{step / 60:g} minutes" if step > 60 else "minute"
    peak = max(item["series"])
    return f"handlings per {minutes}, {_hhmm(start)} to {_hhmm(end)} UTC (peak {peak:,})"


def _hhmm(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M")


def _list_link(status: str) -> str:
    return url("/transactions", {"status": status} if status != "total" else {})


def _warn(count: int, kind: str = "warn") -> str:
    return f'<span class="{kind}">{count:,}</span>' if count else "0"


def overview_body(state: ConsoleState, window: str) -> str:
    bus = esc(state.sources.bus_label)
    if state.sources.transport_url:
        bus = f"bus {bus}"
    return (
        f'<div class="toolbar">{window_links(window, "/")}'
        f'<span class="muted">{bus} · recorder {esc(state.settings.db_url)}</span></div>'
    )
