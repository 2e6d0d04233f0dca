"""Transactions: search by correlation id, event type, a data field, status and time range;
sortable columns; one page of 50 at a time."""

from __future__ import annotations

import time

from choreograph.console.html import badge, esc, seconds, table, url, when
from choreograph.console.queries import SORTS, STATUSES, TxFilter, TxPage, search_transactions
from choreograph.console.state import ConsoleState

_COLUMNS = (
    ("id", "correlation id"),
    (None, "status"),
    ("started", "started"),
    ("last", "last event"),
    (None, "duration"),
    ("events", "events"),
    ("retries", "retries"),
    ("dead_letters", "dead letters"),
    (None, "last type"),
)


async def transactions_live(state: ConsoleState, f: TxFilter) -> str:
    result = await search_transactions(
        state.db, f, now=time.time(), stuck_after=state.settings.stuck_after
    )
    return render_results(result)


def render_results(result: TxPage) -> str:
    f = result.filter
    headers = []
    for key, label in _COLUMNS:
        if key is None:
            headers.append(esc(label))
            continue
        active = f.sort == key
        descending = not (active and f.descending)
        arrow = (" ▼" if f.descending else " ▲") if active else ""
        params = f.params(sort=key, dir="desc" if descending else "asc", page=1)
        cls = ' class="sorted"' if active else ""
        headers.append(f'<a href="{url("/transactions", params)}"{cls}>{esc(label)}{arrow}</a>')
    rows = []
    for row in result.rows:
        cid = row["correlation_id"]
        late = f' <span class="badge late">late: {row["late"]}</span>' if row.get("late") else ""
        rows.append(
            [
                f'<a class="mono" href="{url("/transactions/" + cid)}">{esc(cid)}</a>',
                badge(row["status"]) + late,
                when(row["first_seen"]),
                when(row["last_seen"]),
                seconds(row["duration"]),
                str(row["events"]),
                _num(row["retries"], "warn"),
                _num(row["dead_letters"], "bad"),
                esc(row["last_type"]),
            ]
        )
    pager = []
    if f.page > 1:
        pager.append(f'<a href="{url("/transactions", f.params(page=f.page - 1))}">← newer</a>')
    pager.append(f'<span class="muted">page {f.page}</span>')
    if result.more:
        pager.append(f'<a href="{url("/transactions", f.params(page=f.page + 1))}" '
                     'rel="next">next →</a>')  # fmt: skip
    return (
        table(headers, rows, empty="no transaction matches this search")
        + f'<div class="pager">{" ".join(pager)}'
        + f'<span class="muted">{len(result.rows)} shown · {result.took_ms:.0f} ms</span></div>'
    )


def _num(value: int, kind: str) -> str:
    return f'<span class="{kind}">{value}</span>' if value else "0"


def transactions_form(state: ConsoleState, f: TxFilter, error: str = "") -> str:
    types = sorted(state.sources.classes) if state.app is not None else []
    type_options = '<option value="">any event type</option>' + "".join(
        f"<option{' selected' if t == f.event_type else ''}>{esc(t)}</option>" for t in types
    )
    if f.event_type and f.event_type not in types:
        type_options += f"<option selected>{esc(f.event_type)}</option>"
    status_options = '<option value="">any status</option>' + "".join(
        f'<option value="{s}"{" selected" if s == f.status else ""}>{s.replace("_", " ")}</option>'
        for s in STATUSES
    )
    field_value = f"{f.field_name}={f.field_value}" if f.field_name else ""
    message = f'<div class="notice bad">{esc(error)}</div>' if error else ""
    return f"""{message}<form class="search" method="get" action="/transactions" role="search">
<label>Correlation id or key <input name="q" value="{esc(f.q)}" placeholder="d-000042-…"
 autocomplete="off" autofocus></label>
<label>Event type <select name="type">{type_options}</select></label>
<label>Data field <input name="field" value="{esc(field_value)}"
 placeholder="delivery_id=d-000042-…" autocomplete="off"></label>
<label>Status <select name="status">{status_options}</select></label>
<label>From (UTC) <input type="datetime-local" name="from" value="{esc(_local(f.since))}"></label>
<label>To (UTC) <input type="datetime-local" name="to" value="{esc(_local(f.until))}"></label>
<input type="hidden" name="sort" value="{esc(f.sort if f.sort in SORTS else "started")}">
<input type="hidden" name="dir" value="{"desc" if f.descending else "asc"}">
<button type="submit">Search</button> <a href="/transactions" class="muted">clear</a>
</form>"""


def _local(epoch: float | None) -> str:
    from choreograph.console.queries import format_time

    return format_time(epoch)
