"""``python -m benchmarks [--quick] [--only w1,w2,w3] [--transports nats,redis] [--repeat N]``.

W3 options (each takes a comma-separated list; every combination is measured in the same run):
``--store sqlite,postgres``, ``--layout one,each``, ``--replicas 1,2,4`` (processes per service,
process-per-service layout), ``--io-wait 0,5`` (ms of simulated I/O in package and
drone-scheduler handlers), ``--locking key,service`` (the PostgreSQL store's locking option;
empty for its default), ``--deliveries N``, ``--rate R`` (open loop).
``--transports nats-node,nats-cluster`` puts a 3-node cluster of the run's own (``replicas=3``)
beside a single node of its own with the same settings (W3 only). ``--only orch``: the drone
delivery choreographed and orchestrated, side by side, as it is, with one participant slow and
with one down for a while.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from benchmarks import nats_cluster, w1, w2, w3
from benchmarks.brokers import PREFIX, cleanup, is_up
from benchmarks.config import Config
from benchmarks.harness import BenchError, Row
from benchmarks.machine import describe, load_average
from benchmarks.profiling import summarise
from benchmarks.report import (
    add_ratios,
    markdown_fragment,
    median,
    print_tables,
    write_markdown,
)
from benchmarks.stores import STORES

TRANSPORTS = ("sqlite", "nats", "redis", "amqp", nats_cluster.NODE, nats_cluster.TRANSPORT)
W3_ONLY = (nats_cluster.NODE, nats_cluster.TRANSPORT)
"""Transports only W3 runs on."""
WORKLOADS = ("w1", "w2", "w3", "orch")
SLOW_MS = 50.0
"""The I/O wait of the slow participant in the comparison."""
CELL_TIMEOUT = 420.0


@dataclass
class Cell:
    workload: str
    transport: str
    side: str
    run: Callable[[], Awaitable[Row]]
    needs: str
    """The broker that must be up ('' for none)."""


def plan(cfg: Config, workloads: set[str], transports: list[str]) -> list[Cell]:
    cells: list[Cell] = []
    every = transports
    transports = [t for t in transports if t not in W3_ONLY]
    if "w1" in workloads:
        for t in transports:
            cells.append(Cell("W1 one hop", t, w1.RAW_SIDES[t], _bind(w1.raw, cfg, t), t))
            if t == "amqp":
                side = "raw aio-pika, quorum queue"
                cells.append(Cell("W1 one hop", t, side, _bind(w1.raw, cfg, t, "quorum"), t))
            for level in ("transport", "runtime"):
                side = f"choreograph {level}"
                cells.append(Cell("W1 one hop", t, side, _bind(w1.framework, cfg, t, level), t))
    if "w2" in workloads:
        if "nats" in transports:
            for side in ("raw", "faststream", "faststream-pull"):
                cells.append(
                    Cell("W2 3-hop saga", "nats", side, _bind(w2.nats_side, cfg, side), "nats")
                )
            for store in ("memory", "sqlite"):
                run = _bind(w2.choreograph_side, cfg, "nats", store)
                cells.append(Cell("W2 3-hop saga", "nats", f"choreograph ({store})", run, "nats"))
        for t in transports:
            if t != "nats":
                run = _bind(w2.choreograph_side, cfg, t, "memory")
                cells.append(Cell("W2 3-hop saga", t, "choreograph (memory)", run, t))
    if "w3" in workloads:
        for t in every:
            for variant in w3_variants(cfg):
                needs = "" if t in W3_ONLY else t
                if variant.store == "postgres" and needs == "sqlite":
                    needs = "postgres"
                run = _bind(w3.run, cfg, t, variant)
                cells.append(Cell(w3.WORKLOAD, t, variant.describe(), run, needs))
    if "orch" in workloads:
        cells += comparison_cells(cfg, transports)
    return cells


def comparison_cells(cfg: Config, transports: list[str]) -> list[Cell]:
    """The drone delivery choreographed and orchestrated, side by side, process per service, on
    the first store named: as it is, with drone-scheduler slow (an I/O wait of ``SLOW_MS`` in
    each of its handlings; fewer deliveries and a lower open-loop rate, that it can keep up
    with), and with drone-scheduler stopped for 5 s during the open-loop phase."""
    store = cfg.w3_stores[0]
    if cfg.quick:  # a smoke run: one transport is enough
        transports = ["nats"] if "nats" in transports else transports[:1]
    slow_cfg = dataclasses.replace(cfg, w3_deliveries=min(cfg.w3_deliveries, 200), w3_rate=8.0)
    scenarios: list[tuple[Config, dict[str, Any]]] = [
        (cfg, {}),
        (slow_cfg, {"io_wait_ms": SLOW_MS, "slow": ("drone-scheduler",)}),
        (cfg, {"outage": "drone-scheduler"}),
    ]
    cells = []
    for t in transports:
        needs = "postgres" if store == "postgres" and t == "sqlite" else t
        for the_cfg, scenario in scenarios:
            for flow in w3.APPS:
                variant = w3.Variant("each", store, flow=flow, **scenario)
                run = _bind(w3.run, the_cfg, t, variant, w3.COMPARISON)
                cells.append(Cell(w3.COMPARISON, t, variant.describe(), run, needs))
    return cells


def w3_variants(cfg: Config) -> list[w3.Variant]:
    """Every combination of the W3 options; replicas only apply to a process per service,
    locking only to PostgreSQL stores."""
    variants = []
    for store in cfg.w3_stores:
        for layout in cfg.w3_layouts:
            for replicas in cfg.w3_replicas if layout == "each" else (1,):
                for io_wait in cfg.w3_io_wait_ms:
                    for locking in cfg.w3_lockings if store == "postgres" else ("",):
                        for lanes in cfg.w3_lanes:
                            variant = w3.Variant(
                                layout, store, replicas, io_wait, locking, lanes=lanes
                            )
                            if variant not in variants:
                                variants.append(variant)
    return variants


def _bind(fn: Callable[..., Awaitable[Row]], *args: object) -> Callable[[], Awaitable[Row]]:
    return lambda: fn(*args)


async def run_cell(cell: Cell, repeat: int, console: Console) -> Row:
    runs: list[Row] = []
    for attempt in range(repeat):
        started = time.monotonic()
        if cell.needs and cell.needs != "sqlite" and not is_up(cell.needs):
            row = Row(cell.workload, cell.transport, cell.side, error=f"{cell.needs} is down")
        else:
            try:
                row = await asyncio.wait_for(cell.run(), CELL_TIMEOUT)
            except (BenchError, TimeoutError, OSError, ImportError, Exception) as exc:
                message = str(exc) or type(exc).__name__
                row = Row(cell.workload, cell.transport, cell.side, error=message)
        row.extra["seconds"] = time.monotonic() - started
        row.extra["load"] = load_average()
        runs.append(row)
        status = (
            f"[red]failed[/]: {row.error[:200]}"
            if row.error
            else f"{row.rate:,.0f}/s"
            + (f", p50 {row.p50_ms:.1f} ms, p99 {row.p99_ms:.1f} ms" if row.p99_ms else "")
        )
        suffix = f" (run {attempt + 1}/{repeat})" if repeat > 1 else ""
        console.print(
            f"  {cell.workload:<18} {cell.transport:<7} {row.side:<52} {status}"
            f" [dim]{row.extra['seconds']:.0f}s, load {load_average()}[/]{suffix}",
            highlight=False,
        )
    return median(runs)


async def main_async(args: argparse.Namespace, console: Console) -> int:
    workloads = {w.strip().lower() for w in args.only.split(",")} if args.only else set(WORKLOADS)
    transports = (
        [t.strip() for t in args.transports.split(",")] if args.transports else list(TRANSPORTS)
    )
    unknown = (workloads - set(WORKLOADS) - {"w4"}) | (set(transports) - set(TRANSPORTS))
    if unknown:
        console.print(f"[red]unknown workload or transport: {', '.join(sorted(unknown))}[/]")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="chbench-"))
    profile_dir = Path(args.profile) if args.profile else None
    try:
        w3_options = w3_overrides(args)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    cfg = Config.create(
        workdir, quick=args.quick, repeat=args.repeat, profile_dir=profile_dir, **w3_options
    )
    machine = await describe()
    console.print(
        f"[bold]choreograph benchmarks[/] ({'quick' if cfg.quick else 'full'}), {workdir}"
    )
    for key, value in machine.items():
        console.print(f"  {key}: {value}", highlight=False)
    for transport in ("nats", "redis", "amqp"):
        if transport in transports and is_up(transport):
            await cleanup(transport, PREFIX)  # leftovers of an interrupted run
    rows: list[Row] = []
    started = time.monotonic()
    try:
        for cell in plan(cfg, workloads, transports):
            rows.append(await run_cell(cell, cfg.repeat, console))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    machine["load_after"] = f"load average {load_average()}"
    machine["duration"] = f"{time.monotonic() - started:.0f} s"
    if "w4" in workloads or not args.only:
        machine["W4 (Celery chain)"] = (
            "not measured: celery is not installed in this environment (the book's figure is "
            "364-375 chains/s on Redis; compare the W2 choreograph row on redis)"
        )
    add_ratios(rows)
    print_tables(console, rows, machine)
    if profile_dir is not None:
        report_profiles(profile_dir, console)
    narrowed = any(value is not None for value in w3_options.values())
    command = "python -m benchmarks " + " ".join(sys.argv[1:])
    if args.tables:
        fragment = markdown_fragment(rows, machine, command.strip())
        await asyncio.to_thread(Path(args.tables).write_text, fragment)
        console.print(f"wrote {args.tables}")
    full = not (args.quick or args.only or args.transports or args.profile or narrowed)
    if args.write == "yes" or (args.write == "auto" and full):
        write_markdown(rows, machine, command.strip())
        console.print("wrote benchmarks/RESULTS.md")
    return 1 if any(r.error for r in rows) else 0


def _listed(raw: str, kind: type[Any], allowed: tuple[str, ...] = ()) -> tuple[Any, ...] | None:
    """A comma-separated option as a tuple of ``kind`` (None when not given)."""
    if raw is None:
        return None
    values = tuple(kind(part.strip()) for part in raw.split(","))
    unknown = [v for v in values if allowed and v not in allowed]
    if unknown:
        raise ValueError(f"unknown value {unknown[0]!r}: use {', '.join(allowed)}")
    return values


def w3_overrides(args: argparse.Namespace) -> dict[str, Any]:
    replicas = _listed(args.replicas, int)
    if replicas and min(replicas) < 1:
        raise ValueError("--replicas must be at least 1")
    return {
        "w3_stores": _listed(args.store, str, STORES),
        "w3_layouts": _listed(args.layout, str, ("one", "each")),
        "w3_replicas": replicas,
        "w3_io_wait_ms": _listed(args.io_wait, float),
        "w3_lockings": _listed(args.locking, str),
        "w3_lanes": _listed(args.lanes, int),
        "w3_deliveries": args.deliveries,
        "w3_rate": args.rate,
    }


def report_profiles(profile_dir: Path, console: Console) -> None:
    summaries = []
    for path in sorted(profile_dir.glob("*.prof")):
        try:
            summaries.append(f"==== {path.name}\n{summarise(path)}")
        except Exception as exc:  # an interrupted process leaves a truncated file
            summaries.append(f"==== {path.name}: unreadable ({exc})")
    (profile_dir / "summary.txt").write_text("\n".join(summaries))
    console.print(f"profiles: {len(summaries)} in {profile_dir}, summary in summary.txt")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, a 1-2 minute smoke run")
    parser.add_argument("--only", default="", help="workloads, e.g. w1,w2 (default: all)")
    parser.add_argument(
        "--transports", default="", help=f"subset of {','.join(TRANSPORTS)} (default: all)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per cell; the median is kept")
    parser.add_argument(
        "--write",
        choices=("auto", "yes", "no"),
        default="auto",
        help="rewrite benchmarks/RESULTS.md (auto: only after a full, unfiltered run)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--tables",
        metavar="FILE",
        default="",
        help="also write this run's tables, command and load as Markdown to FILE",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default="",
        help="run the choreograph processes under cProfile, write DIR/*.prof and DIR/summary.txt",
    )
    w3_group = parser.add_argument_group("W3 options (comma-separated lists: every combination)")
    w3_group.add_argument("--store", default=None, help="service stores: sqlite,postgres")
    w3_group.add_argument("--layout", default=None, help="one (process), each (per service)")
    w3_group.add_argument("--replicas", default=None, help="processes per service, e.g. 1,2,4")
    w3_group.add_argument(
        "--io-wait", default=None, help="ms of simulated I/O in package and drone-scheduler"
    )
    w3_group.add_argument(
        "--locking",
        default=None,
        help="PostgreSQL store locking options, e.g. ',service' (empty: the store's default)",
    )
    w3_group.add_argument(
        "--lanes", default=None, help="batches in flight per service process, e.g. 2,8 (0: default)"
    )
    w3_group.add_argument("--deliveries", type=int, default=None, help="deliveries per W3 run")
    w3_group.add_argument(
        "--rate", type=float, default=None, help="W3 open-loop rate, deliveries/s (default 200)"
    )
    args = parser.parse_args()
    if args.profile:
        profile_dir = Path(args.profile).resolve()
        profile_dir.mkdir(parents=True, exist_ok=True)
        args.profile = str(profile_dir)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    console.width = max(console.width, 160)  # the tables stay readable in a log
    sys.exit(asyncio.run(main_async(args, console)))
