"""``choreograph record | trace | stuck | stats | graph | lint | asyncapi``: see the flow."""

from __future__ import annotations

import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import orjson
from rich.table import Table
from rich.tree import Tree

from choreograph.app import App
from choreograph.cli._common import (
    MissingInput,
    app_option,
    console,
    err_console,
    resolve_app,
    run_async,
    transport_option,
)
from choreograph.errors import ConfigurationError
from choreograph.observe.durations import format_duration
from choreograph.observe.flowdb import DEFAULT_DB_URL, FlowDb, SqliteFlowDb, flowdb_from_url
from choreograph.observe.flows import children, flow_stats, load_transaction, stuck_transactions
from choreograph.observe.model import FlowModel
from choreograph.runtime.runner import wait_for_signal
from choreograph.transport import redact

db_option = click.option(
    "--db",
    "db_url",
    envvar="CHOREOGRAPH_RECORDER_DB",
    default=DEFAULT_DB_URL,
    show_default=True,
    help="Recorder database: sqlite:///flows.db or postgresql://....",
)
optional_app_option = click.option(
    "--app",
    "-a",
    "app_spec",
    envvar="CHOREOGRAPH_APP",
    default=None,
    help="The app (module:attribute), to overlay its declared flow.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
app_argument = click.argument("app_spec", metavar="APP", envvar="CHOREOGRAPH_APP")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``30s``, ``5m``, ``1.5h``, ``2d``, ``250ms`` or plain seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise click.BadParameter(f"{text!r} is not a duration (e.g. 30s, 5m, 2h, 1d)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _clock(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _existing(db_url: str) -> FlowDb:
    db = flowdb_from_url(db_url)
    if isinstance(db, SqliteFlowDb) and not Path(db.path).exists():
        raise MissingInput(
            f"no recorder database at {db_url}: run `choreograph record` first (or pass --db)"
        )
    return db


async def _open(db_url: str) -> FlowDb:
    db = _existing(db_url)
    await db.open()
    return db


# record ------------------------------------------------------------------------------------------


@click.command()
@app_option
@transport_option
@db_option
@click.option("--group", default="choreograph-recorder", show_default=True)
@click.option(
    "--retain",
    default=None,
    help="Keep transactions this long after their last event (7d, 12h); older ones are pruned "
    "in the background. Default: keep everything.",
)
@run_async
async def record(
    app_spec: str, transport_url: str, db_url: str, group: str, retain: str | None
) -> None:
    """Record every event and handling of an app into the recorder database, until stopped.

    The recorder only listens (consumer group --group). Services report how each handling went
    when they run with the recorder middleware (CHOREOGRAPH_RECORD=1).
    """
    from choreograph.observe.recorder import Recorder

    app = _app(app_spec)
    keep = parse_duration(retain) if retain else None
    recorder = Recorder(app, transport_url, db_url, group=group, retain=keep)
    await recorder.start()
    console.print(
        f"recording [bold]{app.name}[/] from [cyan]{redact(transport_url)}[/] into {redact(db_url)}"
    )
    try:
        await wait_for_signal()
    finally:
        await recorder.stop()
    console.print(f"stopped; {recorder.recorded} messages recorded, {recorder.invalid} skipped")


# trace -------------------------------------------------------------------------------------------

_OUTCOME_STYLE = {
    "done": "[green]✓ done[/]",
    "duplicate": "[dim]= duplicate[/]",
    "ignored": "[yellow]- ignored[/]",
    "late": "[yellow]⌛ late[/]",
    "retry": "[yellow]↻ retry[/]",
    "dead_letter": "[red]✗ dead-lettered[/]",
}
_EXPECT_STYLE = {
    "pending": "[yellow]… pending[/]",
    "unknown": "[dim]? not reported[/]",
    "external": "[cyan]↗ external[/]",
    "silent": "[red]! silent[/]",
    "waiting": "[yellow]… waiting[/]",
    "incomplete": "[dim]… incomplete[/]",
    "open": "[cyan]⏱ open[/]",
    "overdue": "[red]⏱ overdue[/]",
    "expired": "[red]⏱ expired[/]",
    "met": "[green]⏱ met[/]",
    "cancelled": "[dim]⏱ cancelled[/]",
}
_STATUS_STYLE = {"completed": "green", "failed": "red", "in_flight": "yellow"}


@click.command()
@click.argument("correlation_id")
@db_option
@optional_app_option
@json_option
@click.option("--all", "show_all", is_flag=True, help="Also show bookkeeping-only handlings.")
@run_async
async def trace(
    correlation_id: str, db_url: str, app_spec: str | None, as_json: bool, show_all: bool
) -> None:
    """Show one transaction: its events as a causation tree with every handling (service, time,
    duration, retries, failures, compensations) and, with --app, the declared flow overlaid:
    what happened, what is still pending, and where it is stuck."""
    model = FlowModel(_app(app_spec)) if app_spec else None
    db = await _open(db_url)
    try:
        view = await load_transaction(db, correlation_id, model)
    finally:
        await db.close()
    if view is None:
        raise click.ClickException(f"the recorder has no transaction {correlation_id!r}")
    if as_json:
        _print_json(view)
        return
    _render_trace(view, show_all)


def _render_trace(view: dict[str, Any], show_all: bool) -> None:
    counts = view["counts"]
    status = view["status"]
    style = _STATUS_STYLE.get(status, "white")
    ending = f" ({view['terminal']})" if view["terminal"] else ""
    head = (
        f"[bold]{view['correlation_id']}[/]  [{style}]{status.replace('_', ' ')}{ending}[/]  "
        f"{format_duration(view['duration'])} · {counts['events']} events · {counts['retries']} "
        f"retries · {counts['dead_letters']} dead letters · {counts['compensations']} "
        f"compensations · started {_clock(view['started'])}"
    )
    tree = Tree(head)
    events: list[dict[str, Any]] = view["events"]
    by_id = {e["id"]: e for e in events}
    expected: dict[str | None, list[dict[str, Any]]] = {}
    for item in view.get("expected", []):
        expected.setdefault(item["after"], []).append(item)
    t0 = view["started"]

    def add_event(parent: Tree, event: dict[str, Any]) -> None:
        terminal = " [bold]■ end[/]" if event["type"] == view["terminal"] else ""
        node = parent.add(
            f"[bold cyan]{event['type']}[/] from {event['source']}  "
            f"+{format_duration(max(0.0, event['time'] - t0))}{terminal}"
        )
        kids = children(events, event)
        placed: set[str] = set()
        for handling in event["handlings"]:
            if handling["kind"] == "internal" and not show_all:
                continue
            hnode = node.add(_handling_line(handling))
            for child in kids:
                if child["id"] in placed:
                    continue
                mine = child["id"] in {e["id"] for e in handling["emitted"]} or (
                    not handling["emitted"]
                    and handling["outcome"] == "done"
                    and child["source"] == handling["service"]
                    and handling["kind"] not in ("deadline", "join_timeout")
                )
                if mine:
                    placed.add(child["id"])
                    add_event(hnode, child)
        for item in expected.get(event["id"], []):
            if item["status"] in _EXPECT_STYLE:
                node.add(_expect_line(item))
        for child in kids:
            if child["id"] not in placed:
                add_event(node, child)

    for root in view["roots"]:
        add_event(tree, by_id[root])
    for item in expected.get(None, []):
        tree.add(_expect_line(item))
    console.print(tree)
    if view.get("timers"):
        console.print("[bold]Timers[/] (due times as the services set them):")
        for timer in view["timers"]:
            closed = f" at {_clock(timer['closed_at'])}" if timer["closed_at"] else ""
            console.print(
                f"  ⏱ {timer['service']}.{timer['name']}  set {_clock(timer['set_at'])}, "
                f"due {_clock(timer['due_at'])}  [bold]{timer['status']}[/]{closed}"
            )
    if view.get("stuck_at"):
        console.print("[bold yellow]Waiting for:[/]")
        for item in view["stuck_at"]:
            console.print(
                f"  • {item['service']}.{item['step']} ({item['kind']}): {item['detail']}"
            )
    elif status == "in_flight" and "expected" not in view:
        console.print("[dim]in flight; pass --app to see what it is waiting for[/]")


def _handling_line(h: dict[str, Any]) -> str:
    kind = "" if h["kind"] == "handler" else f" [magenta]({h['kind'].replace('_', ' ')})[/]"
    name = h["handler"] or "?"
    line = (
        f"{h['service']}.{name}{kind}  {_OUTCOME_STYLE.get(h['outcome'], h['outcome'])}  "
        f"attempt {h['attempt']}  {format_duration(h['duration'])}"
    )
    if h["outcome"] == "retry":
        wait = format_duration(h["delay"] or 0)
        line += f"  [yellow]{h['error_type']}: {h['error']}; next in {wait}[/]"
    elif h["outcome"] == "dead_letter":
        line += f"  [red]{h['reason']}: {h['error_type']}: {h['error']}[/]"
    elif h["note"]:
        line += f"  [dim]{h['note']}[/]"
    elif h["kind"] == "join" and not h["emitted"] and h["outcome"] == "done":
        line += "  [dim]part received[/]"
    if h["emitted"]:
        line += "  → " + ", ".join(e["type"] for e in h["emitted"])
    return line


def _expect_line(item: dict[str, Any]) -> str:
    label = _EXPECT_STYLE[item["status"]]
    kind = item["kind"].replace("_", " ")
    return f"{label}  {item['service']}.{item['step']} [magenta]({kind})[/]  {item['detail']}"


# stuck, stats ------------------------------------------------------------------------------------


@click.command()
@db_option
@optional_app_option
@json_option
@click.option("--older-than", default="30s", show_default=True, help="Age: 30s, 5m, 2h, 1d.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@run_async
async def stuck(
    db_url: str, app_spec: str | None, as_json: bool, older_than: str, limit: int
) -> None:
    """List transactions with no terminal event that started longer ago than --older-than;
    with --app, what each is waiting for.

    \b
    Exit codes:
      0  none is stuck
      1  some are (scripts can alert on it)
      2  no recorder database, or bad usage
    """
    age = parse_duration(older_than)
    model = FlowModel(_app(app_spec)) if app_spec else None
    db = await _open(db_url)
    try:
        rows = await stuck_transactions(db, age, model=model, limit=limit)
    finally:
        await db.close()
    if as_json:
        _print_json(rows)
    elif not rows:
        console.print(f"[green]no transaction older than {older_than} is in flight[/]")
    else:
        table = Table(title=f"{len(rows)} transaction(s) in flight for over {older_than}")
        for column in ("correlation id", "age", "idle", "last", "events", "retries", "dead"):
            table.add_column(column)
        if model is not None:
            table.add_column("waiting for")
        for row in rows:
            cells = [
                row["correlation_id"], format_duration(row["age"]), format_duration(row["idle"]),
                row["last_type"], str(row["events"]), str(row["retries"]),
                str(row["dead_letters"]),
            ]  # fmt: skip
            if model is not None:
                cells.append("\n".join(row.get("waiting_for", [])))
            table.add_row(*cells)
        console.print(table)
    if rows:
        raise SystemExit(1)


@click.command()
@db_option
@json_option
@click.option("--stuck-after", default="30s", show_default=True, help="Age that counts as stuck.")
@run_async
async def stats(db_url: str, as_json: bool, stuck_after: str) -> None:
    """Counts: transactions by status, handlings per service by outcome, events by type."""
    db = await _open(db_url)
    try:
        result = await flow_stats(db, stuck_after=parse_duration(stuck_after))
    finally:
        await db.close()
    if as_json:
        _print_json(result)
        return
    tx = result["transactions"]
    console.print(
        f"[bold]{tx['total']}[/] transactions: [green]{tx['completed']} completed[/], "
        f"[red]{tx['failed']} failed[/], [yellow]{tx['in_flight']} in flight[/] "
        f"({tx['stuck']} for over {stuck_after}); {tx['with_retries']} with retries, "
        f"{tx['with_dead_letters']} with dead letters, {tx['compensated']} compensated"
    )
    table = Table(title="handlings per service")
    columns = (
        "done", "retry", "dead_letter", "duplicate", "ignored", "late", "compensations", "timers"
    )  # fmt: skip
    table.add_column("service")
    for column in (*columns, "avg", "max"):
        table.add_column(column.replace("_", " "), justify="right")
    for name, entry in sorted(result["services"].items()):
        table.add_row(
            name,
            *(str(entry.get(c, 0)) for c in columns),
            f"{entry['avg_ms']:.1f}ms",
            f"{entry['max_ms']:.1f}ms",
        )
    console.print(table)
    events = Table(title="events by type")
    events.add_column("type")
    events.add_column("count", justify="right")
    for name, count in result["events"].items():
        events.add_row(name, str(count))
    console.print(events)


# graph, lint, asyncapi ---------------------------------------------------------------------------


def _write(output: Path | None, data: str | bytes) -> None:
    if output is None:
        if isinstance(data, bytes):
            sys.stdout.buffer.write(data)
        else:
            sys.stdout.write(data)
        return
    output.write_bytes(data if isinstance(data, bytes) else data.encode())
    err_console.print(f"wrote {output}")


output_option = click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Write to this file instead of standard output.",
)  # fmt: skip


@click.command()
@app_argument
@click.option(
    "--format", "-f", "fmt", type=click.Choice(["mermaid", "dot", "svg", "png"]),
    default="mermaid", show_default=True,
)  # fmt: skip
@output_option
def graph(app_spec: str, fmt: str, output: Path | None) -> None:
    """Draw the choreography of APP from its declarations: services, events, who emits and who
    consumes, joins, deadlines and compensations. svg and png need Graphviz's dot."""
    from choreograph.observe.graph import render, to_dot, to_mermaid

    app = _app(app_spec)
    if fmt == "png" and output is None and sys.stdout.isatty():
        raise click.UsageError("refusing to write PNG to a terminal; use -o FILE")
    try:
        if fmt == "mermaid":
            _write(output, to_mermaid(app))
        elif fmt == "dot":
            _write(output, to_dot(app))
        else:
            _write(output, render(to_dot(app), "svg" if fmt == "svg" else "png"))
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None


@click.command(name="lint")
@app_argument
@json_option
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too.")
def lint_command(app_spec: str, as_json: bool, strict: bool) -> None:
    """Check the choreography of APP: events nobody consumes or emits, failures nobody handles or
    compensates, joins that can wait forever, cycles. Exits 1 on errors (and with --strict, on
    warnings)."""
    from choreograph.observe.lint import lint

    app = _app(app_spec)
    findings = lint(app)
    errors = [f for f in findings if f.severity == "error"]
    warnings = [f for f in findings if f.severity == "warning"]
    if as_json:
        _print_json([f.as_dict() for f in findings])
    else:
        for f in findings:
            style = "red" if f.severity == "error" else "yellow"
            console.print(f"[{style}]{f.severity}[/] [bold]{f.code}[/]: {f.message}")
        verdict = "[green]ok[/]" if not findings else ""
        console.print(
            f"{app.name}: {len(errors)} error(s), {len(warnings)} warning(s) {verdict}".rstrip()
        )
    if errors or (strict and warnings):
        raise SystemExit(1)


@click.command()
@app_argument
@output_option
@click.option("--version", "doc_version", default="1.0.0", show_default=True,
              help="The document's info.version.")  # fmt: skip
@click.option("--server", default=None, help="Describe this bus URL as the server.")
def asyncapi(app_spec: str, output: Path | None, doc_version: str, server: str | None) -> None:
    """Write the AsyncAPI 3.0 document (JSON) of APP: a channel per event type, send and receive
    operations per service, messages as CloudEvents envelopes with JSON Schema payloads."""
    from choreograph.observe.asyncapi import asyncapi_document

    try:
        doc = asyncapi_document(_app(app_spec), version=doc_version, server=server)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    _write(output, orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


@click.command("diff")
@click.argument("old")
@click.argument("new")
@json_option
def diff_command(old: str, new: str, as_json: bool) -> None:
    """Compare two versions of a contract: OLD and NEW are each an AsyncAPI document (JSON, as
    `choreograph asyncapi` writes it) or an app (module:attribute). Lists breaking and safe
    changes; exits 1 when any change is breaking, so it can gate a release."""
    from choreograph.observe.contract_diff import diff_contracts, read_contract

    changes = diff_contracts(read_contract(_contract(old)), read_contract(_contract(new)))
    breaking = [c for c in changes if c.severity == "breaking"]
    if as_json:
        _print_json([c.as_dict() for c in changes])
    else:
        for c in changes:
            style = "red" if c.severity == "breaking" else "green"
            console.print(
                f"[{style}]{c.severity}[/] [bold]{c.event}[/]: {c.message}", soft_wrap=True
            )
        console.print(f"{len(breaking)} breaking, {len(changes) - len(breaking)} safe change(s)")
    if breaking:
        raise SystemExit(1)


def _contract(spec: str) -> dict[str, Any]:
    """An AsyncAPI document from a file, or written for an app."""
    from choreograph.observe.asyncapi import asyncapi_document

    path = Path(spec)
    if path.is_file():
        try:
            doc = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise click.BadParameter(f"{spec}: not JSON ({exc})") from None
        if not isinstance(doc, dict) or not str(doc.get("asyncapi", "")).startswith("3."):
            raise click.BadParameter(f"{spec}: not an AsyncAPI 3 document")
        return doc
    return asyncapi_document(_app(spec))


def _app(spec: str | None) -> App:
    """Load an app; like uvicorn, the working directory is importable (console scripts do not
    put it on ``sys.path``)."""
    if spec is None:
        raise click.UsageError("name the app: APP argument or CHOREOGRAPH_APP")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return resolve_app(spec)
    except click.BadParameter as exc:
        raise click.BadParameter(exc.message, param_hint="APP") from None


COMMANDS = [record, trace, stuck, stats, graph, lint_command, asyncapi, diff_command]
