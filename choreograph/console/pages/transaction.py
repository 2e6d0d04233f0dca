"""One transaction: its full history (every event, handling, retry, dead letter, timer,
compensation, late event and console action, in order), its causation tree, and the choreography
graph with its path drawn and what it still waits for marked."""

from __future__ import annotations

import time
from typing import Any

from choreograph.console.html import badge, clock, esc, notice, seconds, table, url, when
from choreograph.console.queries import actions_of
from choreograph.console.sources import Unavailable, pretty
from choreograph.console.state import ConsoleState
from choreograph.console.svg import PathOverlay, render_graph
from choreograph.observe.flows import children, load_transaction

Row = dict[str, Any]
_OUTCOME = {"done": "ok", "retry": "warn", "dead_letter": "bad", "ignored": "muted",
            "duplicate": "muted", "late": "late"}  # fmt: skip


async def transaction_live(state: ConsoleState, correlation_id: str) -> str | None:
    """The page's live part, or None when the recorder never saw this transaction."""
    now = time.time()
    view = await load_transaction(state.db, correlation_id, state.model, now=now)
    if view is None:
        return None
    actions = await actions_of(state.db, correlation_id)
    notes: list[str] = []
    try:
        letters = [
            letter
            for letter in await state.sources.letters()
            if letter.correlation_id == correlation_id
        ]
    except Unavailable as exc:
        letters, notes = [], [str(exc)]
    try:
        pending = await state.sources.pending_timers(correlation_id)
    except Unavailable as exc:
        pending, notes = [], [*notes, str(exc)]
    late_ids = _late_events(view)
    parts = [_summary(view, late_ids)]
    if view.get("stuck_at"):
        waits = "".join(
            f"<li><b>{esc(x['service'])}.{esc(x['step'])}</b> ({esc(x['kind'].replace('_', ' '))}"
            f"): {esc(x['detail'])}</li>"
            for x in view["stuck_at"]
        )
        parts.append(f'<div class="waiting-box"><h3>Waiting for</h3><ul>{waits}</ul></div>')
    if state.app is not None:
        overlay = _overlay(view)
        parts.append(
            '<h2>Path through the choreography</h2><div class="graph-wrap">'
            + render_graph(state.app, overlay=overlay)
            + '</div><p class="legend"><span class="k taken"></span>taken '
            '<span class="k waiting"></span>still waiting <span class="k faded"></span>not '
            "taken</p>"
        )
    parts.append("<h2>History</h2>" + _history(view, actions, late_ids))
    if letters:
        rows = [
            [f'<a href="{url("/dead-letters/" + x.id)}">{esc(x.event_type)}</a>',
             esc(x.letter.group), esc(x.letter.failure.reason), esc(x.letter.failure.error),
             when(x.letter.failed_at)]
            for x in letters
        ]  # fmt: skip
        parts.append(
            "<h2>Dead letters now</h2>"
            + table(["event", "group", "reason", "error", "dead-lettered"], rows)
        )
    timer_rows = [
        [esc(service), esc(timer.name), when(timer.due_at), seconds(timer.due_at - now)]
        for service, timer in pending
    ]
    parts.append(
        "<h2>Timers pending in the services' stores</h2>"
        + table(["service", "timer", "due", "in"], timer_rows, empty="none pending")
    )
    parts.append("<h2>Causation tree</h2>" + _tree(view, late_ids))
    parts += [notice(n, "warn") for n in notes]
    return "".join(parts)


def _summary(view: Row, late_ids: set[str]) -> str:
    counts = view["counts"]
    ending = f" ({esc(view['terminal'])})" if view["terminal"] else ""
    late = f'<span class="badge late">{len(late_ids)} late</span>' if late_ids else ""
    took = (
        f"took {seconds(view['duration'])}"
        if view["ended"]
        else f"running for {seconds(view['age'])}"
    )
    return (
        f'<div class="summary">{badge(view["status"])}{ending}{late}'
        f"<span>started {when(view['started'])}</span><span>{took}</span>"
        + "".join(
            f"<span>{_count(counts[key], one, many)}</span>"
            for key, one, many in (
                ("events", "event", "events"),
                ("retries", "retry", "retries"),
                ("dead_letters", "dead letter", "dead letters"),
                ("compensations", "compensation", "compensations"),
            )
        )
        + "</div>"
    )


def _count(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


def _late_events(view: Row) -> set[str]:
    """Events that arrived after the transaction ended although their cause came before."""
    ended = view["ended"]
    if ended is None:
        return set()
    times = {e["id"]: e["time"] for e in view["events"]}
    return {
        e["id"]
        for e in view["events"]
        if e["time"] > ended
        and e["type"] != view["terminal"]
        and times.get(e["causation_id"] or "", ended) < ended
    }


def _overlay(view: Row) -> PathOverlay:
    events = view["events"]
    handled = [(e, h) for e in events for h in e["handlings"]]
    edges = {(e["source"], e["type"]) for e in events}
    edges |= {(e["type"], h["service"]) for e, h in handled if h["outcome"] != "duplicate"}
    waiting_services, waiting_edges = set(), set()
    for item in view.get("stuck_at", []):
        waiting_services.add(item["service"])
        if item["event_type"]:
            waiting_edges.add((item["event_type"], item["service"]))
        if item["kind"] == "join" and "waiting for " in item["detail"]:
            for missing in item["detail"].split("waiting for ", 1)[1].split(", "):
                waiting_edges.add((missing, item["service"]))
    return PathOverlay(
        events=frozenset(e["type"] for e in events),
        services=frozenset(h["service"] for _, h in handled),
        edges=frozenset(edges),
        waiting_services=frozenset(waiting_services),
        waiting_edges=frozenset(waiting_edges),
        failed=frozenset(h["service"] for _, h in handled if h["outcome"] == "dead_letter"),
    )


def _history(view: Row, actions: list[Row], late_ids: set[str]) -> str:
    items: list[tuple[float, int, str, str, str, str]] = []
    for event in view["events"]:
        kind = "late event" if event["id"] in late_ids else "event"
        if event["type"] == view["terminal"]:
            kind = "end"
        keys = ", ".join(
            f"{k}={v}" for k, v in event["data"].items() if isinstance(v, str | int | float)
        )
        items.append((event["time"], 0, kind, f"<b>{esc(event['type'])}</b>",
                      f"published by {esc(event['source'])}", esc(keys[:200])))  # fmt: skip
        for h in event["handlings"]:
            items.append(_handling(h))
    for timer in view.get("timers", []):
        name = f"{esc(timer['service'])}.{esc(timer['name'])}"
        wait = seconds(timer["due_at"] - timer["set_at"])
        items.append((timer["set_at"], 2, "timer set", name,
                      f"due {when(timer['due_at'])} ({wait} later)", ""))  # fmt: skip
        if timer["closed_at"] is not None:
            items.append((timer["closed_at"], 3, f"timer {timer['status']}", name, "", ""))
    for action in actions:
        edited = " with edited data" if action["edited"] else ""
        items.append((action["at"], 4, f"console {action['action']}",
                      f"{esc(action['event_type'])} to {esc(action['grp'])}{edited}",
                      esc(action["result"]), ""))  # fmt: skip
    items.sort(key=lambda item: (item[0], item[1]))
    start = view["started"]
    rows = [
        [f'<span class="muted">+{seconds(max(0.0, at - start))}</span>', clock(at),
         f'<span class="kind {esc(kind.replace(" ", "-"))}">{esc(kind)}</span>', what, detail,
         extra]
        for at, _, kind, what, detail, extra in items
    ]  # fmt: skip
    return table(["", "time (UTC)", "kind", "what", "detail", ""], rows, name="history")


def _handling(h: Row) -> tuple[float, int, str, str, str, str]:
    kind = h["kind"]
    outcome = h["outcome"]
    label = {"compensation": "compensation", "deadline": "timer fired",
             "join_timeout": "timer fired", "join": "join part"}.get(kind, "handling")  # fmt: skip
    if outcome == "retry":
        label = "retry"
    elif outcome == "dead_letter":
        label = "dead letter"
    elif outcome == "late" or (outcome == "ignored" and "late" in (h["note"] or "")):
        label = "late event"
    what = f"{esc(h['service'])}.{esc(h['handler'] or '?')}"
    detail = f'<span class="{_OUTCOME.get(outcome, "")}">{esc(outcome.replace("_", " "))}</span>'
    detail += f" · attempt {h['attempt']} · {seconds(h['duration'])}"
    extra = ""
    if outcome == "retry":
        extra = f"{esc(h['error_type'])}: {esc(h['error'])}; next in {seconds(h['delay'] or 0)}"
    elif outcome == "dead_letter":
        extra = f"{esc(h['reason'])}: {esc(h['error_type'])}: {esc(h['error'])}"
    elif h["note"]:
        extra = esc(h["note"])
    if h["emitted"]:
        extra += (" → " if extra else "→ ") + ", ".join(esc(e["type"]) for e in h["emitted"])
    if kind == "internal":
        label = "bookkeeping"
    return (h["started"], 1, label, what, detail, extra)


def _tree(view: Row, late_ids: set[str]) -> str:
    events = view["events"]
    by_id = {e["id"]: e for e in events}

    def node(event: Row, depth: int) -> str:
        late = ' <span class="badge late">late</span>' if event["id"] in late_ids else ""
        end = ' <span class="badge end">end</span>' if event["type"] == view["terminal"] else ""
        handlers = " ".join(
            f'<span class="chip {_OUTCOME.get(h["outcome"], "")}" title="{esc(h["outcome"])}">'
            f"{esc(h['service'])}.{esc(h['handler'] or '?')}</span>"
            for h in event["handlings"]
            if h["kind"] != "internal"
        )
        kids = "".join(node(c, depth + 1) for c in children(events, event)) if depth < 60 else ""
        inner = f"<ul>{kids}</ul>" if kids else ""
        return (
            f'<li><details data-key="{esc(event["id"])}"><summary><b>{esc(event["type"])}</b> '
            f'<span class="muted">from {esc(event["source"])}</span>{late}{end} {handlers}'
            f'</summary><pre class="data">{esc(pretty(event["data"]))}</pre></details>'
            f"{inner}</li>"
        )

    roots = "".join(node(by_id[r], 0) for r in view["roots"])
    return f'<ul class="tree">{roots}</ul>'
