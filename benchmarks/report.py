"""Ratios against the baselines, the rich tables, and ``benchmarks/RESULTS.md``.

``RESULTS.md`` is rewritten on every full run, except the hand-written analysis between the
``analysis`` markers, which is kept (it names the run it was written for).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.harness import Row

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ANALYSIS_START = "<!-- analysis:start -->"
ANALYSIS_END = "<!-- analysis:end -->"
COLUMNS = ("workload", "transport", "side", "rate /s", "p50 ms", "p99 ms", "CPU s", "ratio")
W3_TARGETS = {
    ("sqlite", "sqlite"): 3000.0,
    ("nats", "sqlite"): 2500.0,
    ("nats", "postgres"): 2000.0,
}
"""W3 targets by (transport, store) from the workload book."""


def median(rows: Sequence[Row]) -> Row:
    """The run with the median rate (lower middle of an even count)."""
    ok = sorted((r for r in rows if not r.error and r.rate), key=lambda r: r.rate or 0.0)
    if not ok:
        return rows[-1]
    chosen = ok[(len(ok) - 1) // 2]
    if len(rows) > 1:
        rates = ", ".join(f"{r.rate:,.0f}" for r in ok)
        chosen.note = f"median of {len(ok)} ({rates})" + (f"; {chosen.note}" if chosen.note else "")
    return chosen


def add_ratios(rows: list[Row]) -> None:
    """Fill ``ratio``: framework vs raw (W1), vs FastStream and raw (W2), vs target (W3)."""

    def find(workload: str, transport: str, side_start: str) -> Row | None:
        for row in rows:
            if (
                row.workload == workload
                and row.transport == transport
                and row.side.startswith(side_start)
                and row.rate
                and not row.error
            ):
                return row
        return None

    for row in rows:
        if row.error or not row.rate:
            continue
        if row.workload.startswith("W1") and not row.baseline:
            raw = find(row.workload, row.transport, "raw")
            if raw and raw.rate:
                row.ratio = f"{row.rate / raw.rate:.2f}x raw"
        elif row.workload.startswith("W2") and not row.side.startswith("raw"):
            raw = find(row.workload, "nats", "raw")
            parts = []
            if row.side.startswith("choreograph"):
                fs = find(row.workload, "nats", "FastStream (push")
                if fs and fs.rate and row.transport == "nats":
                    parts.append(f"{row.rate / fs.rate:.2f}x FS push")
            elif raw and raw.rate:
                parts.append(f"{row.rate / raw.rate:.2f}x raw")
            if raw and raw.p99_ms and row.p99_ms and row.transport == "nats":
                parts.append(f"p99 {row.p99_ms / raw.p99_ms:.1f}x raw")
            row.ratio = "; ".join(parts)
        elif row.workload.startswith("W3"):
            row.ratio = _w3_ratio(row, rows)


def _w3_ratio(row: Row, rows: list[Row]) -> str:
    """Orchestrated against choreographed (same scenario), a cluster against the single node
    (same variant), otherwise against the book's target."""

    def twin(transport: str, side: str) -> Row | None:
        for other in rows:
            same = other.workload == row.workload and other.transport == transport
            if same and other.side == side and other.rate and not other.error:
                return other
        return None

    if row.side.startswith("orchestrated"):
        choreographed = twin(row.transport, row.side.replace("orchestrated", "choreograph", 1))
        if choreographed and choreographed.rate and row.rate:
            return f"{row.rate / choreographed.rate:.2f}x choreography"
        return ""
    if row.side.startswith("choreograph") and row.workload != "W3 drone delivery":
        return ""  # the comparison's reference row
    if row.transport == "nats-cluster":
        single = twin("nats-node", row.side) or twin("nats", row.side)
        if single and single.rate and row.rate:
            return f"{row.rate / single.rate:.2f}x single node"
        return ""
    store = "postgres" if "postgres stores" in row.side else "sqlite"
    target = W3_TARGETS.get((row.transport, store))
    if target and row.rate:
        return f"{row.rate / target:.2f}x target {target:,.0f}"
    return ""


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}"


def _cells(row: Row) -> list[str]:
    if row.error:
        return [row.workload, row.transport, row.side, "failed", "", "", "", row.error[:120]]
    return [
        row.workload,
        row.transport,
        row.side,
        _fmt(row.rate),
        _fmt(row.p50_ms, 1),
        _fmt(row.p99_ms, 1),
        _fmt(row.cpu_s, 2),
        row.ratio,
    ]


def _groups(rows: Iterable[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.workload, []).append(row)
    return groups


def print_tables(console: Console, rows: list[Row], machine: dict[str, str]) -> None:
    for workload, group in _groups(rows).items():
        table = Table(title=workload, title_justify="left")
        for column in COLUMNS[1:]:  # the title names the workload
            justify = "left" if column in ("transport", "side", "ratio") else "right"
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for row in group:
            table.add_row(*_cells(row)[1:], style="red" if row.error else None)
        console.print(table)
    for key, value in machine.items():
        console.print(f"[bold]{key}[/]: {value}")


def _markdown_table(rows: list[Row]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in _cells(row)) + " |")
    return lines


def _cpu_lines(rows: list[Row]) -> list[str]:
    lines = [
        "| workload | transport | side | CPU per process (s) | load avg after (own processes too) "
        "| notes |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if not row.error:
            lines.append(
                f"| {row.workload} | {row.transport} | {row.side} | {row.cpu_detail} "
                f"| {row.extra.get('load', '')} | {row.note.replace('|', '/')} |"
            )
    return lines


def derived_bounds(rows: list[Row]) -> list[str]:
    """Per-message CPU of each W1 process, and the rate one core would allow at that cost."""
    out = []
    for row in rows:
        if row.error or not row.workload.startswith("W1") or not row.extra.get("cpu_consumer"):
            continue
        n = row.extra["rate"] * row.extra["elapsed"]
        prod_us = row.extra["cpu_producer"] / n * 1e6
        cons_us = row.extra["cpu_consumer"] / n * 1e6
        busy = max(row.extra["cpu_producer"], row.extra["cpu_consumer"]) / row.extra["elapsed"]
        out.append(
            f"- W1 {row.transport}, {row.side}: producer {prod_us:.1f} µs/msg, consumer "
            f"{cons_us:.1f} µs/msg (one core at that cost: {1e6 / max(cons_us, 0.01):,.0f}/s); "
            f"busiest process {busy:.0%} of a core over the run."
        )
    for row in rows:
        if row.error or not row.workload.startswith(("W2", "W3")) or not row.cpu_s:
            continue
        count = row.extra.get("n") or row.extra.get("count")
        unit = "tx" if row.workload.startswith("W2") else "delivery"
        if count:
            out.append(
                f"- {row.workload} {row.transport}, {row.side}: {row.cpu_s / count * 1e6:,.0f} µs "
                f"of service CPU per {unit} (all processes summed)."
            )
    return out


def markdown_fragment(rows: list[Row], machine: dict[str, str], command: str) -> str:
    """This run's tables, the command that made them and the machine's load, as a piece of
    Markdown to paste into ``RESULTS.md`` (for runs of some cells only)."""
    lines = [
        f"`{command}`, {machine.get('date', '?')}, git {machine.get('choreograph', '?')}; "
        f"{machine.get('load_before', '')}; after: {machine.get('load_after', '')}; "
        f"{machine.get('duration', '')}.",
    ]
    for _, group in _groups(rows).items():
        lines += ["", *_markdown_table(group)]
    lines += ["", *_cpu_lines(rows)]
    return "\n".join(lines) + "\n"


def _kept_analysis(path: Path) -> str:
    if not path.exists():
        return ""
    match = re.search(
        re.escape(ANALYSIS_START) + r"(.*?)" + re.escape(ANALYSIS_END), path.read_text(), re.S
    )
    return match.group(1).strip() if match else ""


def write_markdown(
    rows: list[Row], machine: dict[str, str], command: str, path: Path = RESULTS
) -> None:
    analysis = _kept_analysis(path) or "_(no analysis written yet)_"
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{command}` on {machine.get('date', '?')}. Definitions and the figures to "
        "beat: `/work/shared/WORKLOADS.md`. Every baseline ran in the same invocation as the "
        "framework figure it is compared with. One run per cell unless a note says otherwise.",
        "",
        "Run: `make bench` (this file is rewritten after a full, unfiltered run), "
        "`make bench BENCH_ARGS=--quick` (1-2 minute smoke run), "
        "`BENCH_ARGS='--only w1,w2 --transports nats,redis'`, `--repeat 3` (median of 3), "
        "`--profile DIR` (cProfile of every choreograph process, summary in DIR/summary.txt).",
        "",
        "Columns: *rate* is events/s (W1), transactions/s (W2, N sent at once) or deliveries/s "
        "(W3, N submitted at once), first publish to last completion; *p50/p99* are measured at "
        "a fixed open-loop rate (W2 500 tx/s, W3 200 deliveries/s) from the scheduled publish "
        "time; *CPU s* is the CPU of the measured processes (producer + consumer, or the "
        "services) during the throughput phase, brokers and driver excluded.",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- **{key}**: {value}" for key, value in machine.items()]
    for workload, group in _groups(rows).items():
        lines += ["", f"## {workload}", "", *_markdown_table(group)]
    lines += ["", "## CPU per process", "", *_cpu_lines(rows)]
    lines += ["", "## Derived from the measurements", "", *derived_bounds(rows)]
    lines += ["", "## What bounds each figure", "", ANALYSIS_START, analysis, ANALYSIS_END, ""]
    path.write_text("\n".join(lines))
