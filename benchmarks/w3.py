"""W3 — the drone delivery, all services in one process or each in its own, per transport.

Knobs: no rejections, no transient errors, flight_seconds 0, a join timeout far beyond the run.
The fleet (one drone per delivery of the run, so no request ever waits for a free drone) is written
into drone-scheduler's store before the clock starts, so its one-off cost is not in the figure.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks.brokers import cleanup, framework_url, fresh_namespace
from benchmarks.config import Config
from benchmarks.harness import Proc, Row, processes
from benchmarks.profiling import service_argv
from benchmarks.w2 import CHOREOGRAPH
from choreograph.demo.app import create_app
from choreograph.demo.drone_scheduler import drone_id
from choreograph.demo.inspect_state import snapshot
from choreograph.demo.knobs import Knobs
from choreograph.store import store_from_url

APP = "choreograph.demo.app:create_app"
WORKLOAD = "W3 drone delivery"


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
            for number in range(1, size + 1):
                await tx.put("drone", drone_id(number), {"status": "free", "delivery": ""})
            await tx.put("fleet", "size", {"drones": size})
    finally:
        await store.close()
    return time.monotonic() - started


async def _settled(store_template: str, expected: int, timeout: float = 20.0) -> str:
    """Wait until ingestion saw every outcome and every drone is free again; say whether the
    stores are consistent (what ``inspect_state`` checks)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = await snapshot(store_template)
        if snap.terminal >= expected and snap.drones_reserved == 0:
            break
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    ok = snap.terminal == expected and snap.drones_reserved == 0
    state = "consistent" if ok else "INCONSISTENT"
    return f"{state}: {snap.terminal}/{expected} ended, {snap.drones_reserved} drones held"


async def run(cfg: Config, transport: str, layout: str) -> Row:
    """``layout``: ``one`` (every service in one process) or ``each`` (a process per service)."""
    ns = fresh_namespace("w3")
    workdir = cfg.workdir / f"w3-{transport}-{layout}-{ns}"
    workdir.mkdir(parents=True, exist_ok=True)
    url = framework_url(transport, ns, str(workdir / "bus.db"))
    store = f"sqlite:///{workdir}/{{service}}.db"
    the_knobs = knobs(cfg)
    fleet_seconds = await create_fleet(store, the_knobs.fleet_size)
    env = the_knobs.to_env()
    deliveries = cfg.w3_deliveries
    latency_total = int(cfg.w3_rate * cfg.w3_seconds)
    timeout = 60 + deliveries / 50
    try:
        async with processes(workdir) as procs:
            common = ["--transport", url, "--store", store, "--batch-size", "200"]
            services: list[Proc] = []
            if layout == "one":
                argv = [CHOREOGRAPH, "run", "--app", APP, *common]
                argv = service_argv(cfg.profile_dir, f"w3-{transport}-one", argv)
                services.append(await procs.spawn("all-services", argv, env))
            else:
                for name in create_app(the_knobs).services:
                    argv = [CHOREOGRAPH, "run", "--app", APP, "--service", name, *common]
                    argv = service_argv(cfg.profile_dir, f"w3-{transport}-each-{name}", argv)
                    services.append(await procs.spawn(name, argv, env))
            for service in services:
                await service.output_containing("running", 60)
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
            before = [s.cpu_seconds() for s in services]
            await client.message("throughput_end", timeout)
            cpu = [s.cpu_seconds() - b for s, b in zip(services, before, strict=True)]
            result: dict[str, Any] = await client.message("result", timeout + cfg.w3_seconds)
            state = await _settled(store, deliveries + latency_total)
    finally:
        await cleanup(transport, ns)
    per_delivery_ms = sum(cpu) / deliveries * 1000
    detail = " / ".join(f"{c:.2f}" for c in cpu) if len(cpu) > 1 else f"{cpu[0]:.2f}"
    side = "choreograph, one process" if layout == "one" else "choreograph, process per service"
    return Row(
        WORKLOAD,
        transport,
        side,
        rate=result["rate"],
        p50_ms=result.get("p50_ms"),
        p99_ms=result.get("p99_ms"),
        cpu_s=sum(cpu),
        cpu_detail=f"{detail} ({per_delivery_ms:.2f} ms/delivery)",
        note=f"{state}; fleet of {the_knobs.fleet_size} written in {fleet_seconds:.1f}s",
        extra={**result, "cpu": cpu, "count": deliveries},
    )
