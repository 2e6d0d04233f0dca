"""W3 — the drone delivery, all services in one process or each in its own, per transport.

Knobs: no rejections, no transient errors, flight_seconds 0, a join timeout far beyond the run.
The fleet (one drone per delivery of the run, so no request ever waits for a free drone) is written
into drone-scheduler's store before the clock starts, so its one-off cost is not in the figure.

A :class:`Variant` says what else differs: the kind of service store (SQLite files or PostgreSQL
schemas of the run's own), replicas of every service (process per service only), a simulated
I/O wait in package and drone-scheduler handlers (or in the services named), the PostgreSQL
store's locking, the flow (the choreography, or the same work driven by an orchestrator:
``benchmarks/orchestrated.py``), and an outage: one service stopped (SIGTERM) two seconds into
the open-loop phase and started again a few seconds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import io_wait, nats_cluster
from benchmarks.brokers import cleanup, framework_url, fresh_namespace
from benchmarks.config import Config
from benchmarks.harness import Proc, Processes, Row, processes
from benchmarks.profiling import service_argv
from benchmarks.stores import drop_stores, store_template
from benchmarks.w2 import CHOREOGRAPH
from choreograph.app import load_app
from choreograph.demo.drone_scheduler import ensure_fleet
from choreograph.demo.inspect_state import Snapshot, snapshot
from choreograph.demo.knobs import Knobs
from choreograph.demo.tables import DroneTables
from choreograph.orm import create_tables, session_on
from choreograph.store import store_from_url

APPS = {
    "choreography": "choreograph.demo.app:create_app",
    "orchestration": "benchmarks.orchestrated:create_app",
}
WORKLOAD = "W3 drone delivery"
IO_WAIT_MIDDLEWARE = "benchmarks.io_wait:from_env"
COMPARISON = "W3 choreography vs orchestration"
OUTAGE_AFTER = 2.0
"""Seconds into the open-loop phase at which the outage starts."""


@dataclass(frozen=True)
class Variant:
    layout: str = "one"
    """``one`` (every service in one process) or ``each`` (a process per service)."""
    store: str = "sqlite"
    """``sqlite`` or ``postgres``."""
    replicas: int = 1
    """Processes per service (``each`` only)."""
    io_wait_ms: float = 0.0
    """Simulated I/O wait in every handler of package and drone-scheduler."""
    locking: str = ""
    """The PostgreSQL store's locking option ('' for its default)."""
    flow: str = "choreography"
    """``choreography`` (the demo app) or ``orchestration`` (:mod:`benchmarks.orchestrated`)."""
    slow: tuple[str, ...] = ()
    """The services the I/O wait is in (default: package and drone-scheduler)."""
    outage: str = ""
    """A service stopped during the open-loop phase ('' for none; ``each`` layout only)."""
    outage_seconds: float = 5.0
    lanes: int = 0
    """Batches in flight per service process (``choreograph run --concurrency``; 0: its
    default, 2)."""

    def describe(self) -> str:
        where = "one process" if self.layout == "one" else "process per service"
        if self.replicas > 1:
            where += f" x{self.replicas}"
        who = "choreograph" if self.flow == "choreography" else "orchestrated"
        parts = [f"{who}, {where}", f"{self.store} stores"]
        if self.locking:
            parts.append(f"locking={self.locking}")
        if self.lanes:
            parts.append(f"{self.lanes} lanes")
        if self.io_wait_ms:
            parts.append(
                f"io wait {self.io_wait_ms:g} ms"
                + (f" in {'+'.join(self.slow)}" if self.slow else "")
            )
        if self.outage:
            parts.append(f"{self.outage} down {self.outage_seconds:g} s")
        return ", ".join(parts)


def knobs(cfg: Config) -> Knobs:
    return Knobs(
        rejection_rate=0.0,
        transient_error_rate=0.0,
        fleet_size=cfg.w3_deliveries,
        flight_seconds=0.0,
        join_timeout=600.0,
    )


async def create_fleet(store_template: str, size: int) -> float:
    """Write the fleet into drone-scheduler's store; returns the seconds it took."""
    started = time.monotonic()
    store = store_from_url(store_template, "drone-scheduler")
    await store.open()
    try:
        async with store.transaction() as tx:
            await create_tables(tx, DroneTables.metadata)
            async with session_on(tx) as session:
                await ensure_fleet(session, size)
    finally:
        await store.close()
    return time.monotonic() - started


async def _settled(store_template: str, expected: int, timeout: float = 20.0) -> str:
    """Wait until ingestion saw every outcome and every drone is free again; say whether the
    stores are consistent (what ``inspect_state`` checks). A store busy for longer than its
    lock timeout (a SQLite service holding its write lock through a slow batch) is read again
    at the next poll."""
    deadline = time.monotonic() + timeout
    snap: Snapshot | None = None
    unreadable = ""
    while True:
        try:
            snap = await snapshot(store_template)
        except Exception as exc:
            unreadable = f"{type(exc).__name__}: {exc}"
        else:
            if snap.terminal >= expected and snap.drones_reserved == 0:
                break
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    if snap is None:
        return f"UNREAD: the stores could not be read ({unreadable})"
    ok = snap.terminal == expected and snap.drones_reserved == 0
    state = "consistent" if ok else "INCONSISTENT"
    return f"{state}: {snap.terminal}/{expected} ended, {snap.drones_reserved} drones held"


@contextlib.asynccontextmanager
async def bus(transport: str, namespace: str, workdir: Path) -> AsyncIterator[str]:
    """The transport URL of one run, in a namespace of its own, removed afterwards (a cluster
    of the run's own for ``nats-cluster``)."""
    if transport == nats_cluster.TRANSPORT:
        async with nats_cluster.cluster_url(workdir / "cluster", namespace) as url:
            yield url
        return
    if transport == nats_cluster.NODE:
        async with nats_cluster.node_url(workdir / "node", namespace) as url:
            yield url
        return
    try:
        yield framework_url(transport, namespace, str(workdir / "bus.db"))
    finally:
        await cleanup(transport, namespace)


@dataclass
class Services:
    """The service processes of one run, by service (``all`` when in one process)."""

    procs: Processes
    env: dict[str, str]
    argv: dict[str, list[list[str]]] = field(default_factory=dict)
    running: dict[str, list[Proc]] = field(default_factory=dict)

    async def start(self, service: str, argv: list[str]) -> Proc:
        replica = len(self.running.setdefault(service, []))
        proc = await self.procs.spawn(f"{service}-{replica}", argv, self.env)
        self.running[service].append(proc)
        return proc

    async def outage(self, service: str, after: float, seconds: float) -> None:
        """Stop every replica of ``service`` after ``after`` seconds (SIGTERM: it finishes or
        hands back what it holds), start them again ``seconds`` later."""
        await asyncio.sleep(after)
        await asyncio.gather(*(p.stop() for p in self.running[service]))
        self.running[service] = []
        await asyncio.sleep(seconds)
        for argv in self.argv[service]:
            await (await self.start(service, argv)).output_containing("running", 60)

    def cpu(self) -> dict[str, float]:
        return {s: sum(p.cpu_seconds() for p in group) for s, group in self.running.items()}


async def start_services(
    procs: Processes, cfg: Config, name: str, common: list[str], env: dict[str, str], v: Variant
) -> Services:
    """Start the services of the variant's flow, each in its own process(es) or all in one."""
    services = Services(procs, env)
    if v.layout == "one":
        argv = service_argv(cfg.profile_dir, f"{name}-one", [CHOREOGRAPH, "run", *common])
        services.argv["all"] = [argv]
    else:
        app = load_app(APPS[v.flow])
        for service in app.services:
            for replica in range(v.replicas):
                argv = [CHOREOGRAPH, "run", "--service", service, *common]
                argv = service_argv(cfg.profile_dir, f"{name}-{service}-{replica}", argv)
                services.argv.setdefault(service, []).append(argv)
    for service, argvs in services.argv.items():
        for argv in argvs:
            await services.start(service, argv)
    for proc in (p for group in services.running.values() for p in group):
        await proc.output_containing("running", 60)
    return services


async def run(cfg: Config, transport: str, variant: Variant, workload: str = WORKLOAD) -> Row:
    ns = fresh_namespace("w3")
    workdir = cfg.workdir / f"w3-{transport}-{ns}"
    workdir.mkdir(parents=True, exist_ok=True)
    store = store_template(variant.store, workdir, ns, variant.locking)
    the_knobs = knobs(cfg)
    env = the_knobs.to_env()
    env[io_wait.ENV] = str(variant.io_wait_ms)
    env[io_wait.SERVICES_ENV] = ",".join(variant.slow)
    deliveries = cfg.w3_deliveries
    latency_total = int(cfg.w3_rate * cfg.w3_seconds)
    # A slow service: each delivery passes through it about 4 times, one after the other.
    timeout = 60 + deliveries / 50 + deliveries * 4 * variant.io_wait_ms / 1000
    try:
        fleet_seconds = await create_fleet(store, the_knobs.fleet_size)
        async with bus(transport, ns, workdir) as url, processes(workdir) as procs:
            app = APPS[variant.flow]
            common = ["--app", app, "--transport", url, "--store", store, "--batch-size", "200"]
            if variant.io_wait_ms:
                common += ["--middleware", IO_WAIT_MIDDLEWARE]
            if variant.lanes:
                common += ["--concurrency", str(variant.lanes)]
            services = await start_services(procs, cfg, f"w3-{transport}", common, env, variant)
            client = await procs.child(
                "client",
                "benchmarks.w3_client:client",
                {
                    "url": url,
                    "n": deliveries,
                    "rate": cfg.w3_rate,
                    "seconds": cfg.w3_seconds,
                    "timeout": timeout,
                },
            )
            await client.message("throughput_start", 60)
            before = services.cpu()
            await client.message("throughput_end", timeout)
            cpu = {s: c - before[s] for s, c in services.cpu().items()}
            await _settled(store, deliveries, timeout)  # what follows the terminal events too
            client.send("go")
            if variant.outage and latency_total:
                await client.message("latency_start", 60)
                outage = services.outage(variant.outage, OUTAGE_AFTER, variant.outage_seconds)
                await outage
            result: dict[str, Any] = await client.message("result", timeout + cfg.w3_seconds)
            state = await _settled(store, deliveries + latency_total)
    finally:
        await drop_stores(variant.store, ns)
    total_cpu = sum(cpu.values())
    per_delivery_ms = total_cpu / deliveries * 1000
    detail = " / ".join(f"{s} {c:.2f}" for s, c in cpu.items())
    return Row(
        workload,
        transport,
        variant.describe(),
        rate=result["rate"],
        p50_ms=result.get("p50_ms"),
        p99_ms=result.get("p99_ms"),
        cpu_s=total_cpu,
        cpu_detail=f"{detail} ({per_delivery_ms:.2f} ms/delivery)",
        note=f"{state}; max {result.get('max_ms', 0):,.0f} ms; "
        f"fleet of {the_knobs.fleet_size} written in {fleet_seconds:.1f}s",
        extra={**result, "cpu": cpu, "count": deliveries},
    )
