"""W2 — the three-hop saga, each service its own OS process, the client in another."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from benchmarks.brokers import NATS_URL, cleanup, framework_url, fresh_namespace
from benchmarks.config import Config
from benchmarks.harness import Proc, Row, processes
from benchmarks.profiling import service_argv

HOPS = (
    ("payments", "OrderPlaced", "PaymentCaptured"),
    ("stock", "PaymentCaptured", "StockReserved"),
    ("shipping", "StockReserved", "OrderCompleted"),
)
CHOREOGRAPH = str(Path(sys.executable).parent / "choreograph")
WORKLOAD = "W2 3-hop saga"


async def _measure(cfg: Config, client: Proc, services: list[Proc]) -> dict[str, Any]:
    timeout = 60 + cfg.w2_transactions / 100
    await client.message("throughput_start", 60)
    before = [s.cpu_seconds() for s in services]
    await client.message("throughput_end", timeout)
    after = [s.cpu_seconds() for s in services]
    cpu = [a - b for a, b in zip(after, before, strict=True)]
    result = await client.message("result", timeout + cfg.w2_seconds)
    result["cpu"] = cpu
    # CPU share of the services while the open-loop phase ran (and drained)
    busy = sum(s.cpu_seconds() for s in services) - sum(after)
    result["latency_phase_cores"] = busy / result["latency_seconds"]
    return result


def _client_args(cfg: Config, bus: str, url: str, ns: str) -> dict[str, Any]:
    return {
        "bus": bus,
        "url": url,
        "ns": ns,
        "n": cfg.w2_transactions,
        "rate": cfg.w2_rate,
        "seconds": cfg.w2_seconds,
        "timeout": 60 + cfg.w2_transactions / 100,
    }


def _row(transport: str, side: str, result: dict[str, Any], *, baseline: bool = False) -> Row:
    cpu = result["cpu"]
    per_tx_us = sum(cpu) / result["n"] * 1e6 if result.get("n") else 0.0
    return Row(
        WORKLOAD,
        transport,
        side,
        rate=result["tx_rate"],
        p50_ms=result["p50_ms"],
        p99_ms=result["p99_ms"],
        cpu_s=sum(cpu),
        cpu_detail=(
            "services " + " / ".join(f"{c:.2f}" for c in cpu) + f" ({per_tx_us:.0f} µs/tx); "
            f"{result['latency_phase_cores']:.2f} cores busy at {result['rate']:.0f} tx/s"
        ),
        baseline=baseline,
        extra=result,
    )


async def _create_stream(ns: str) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        await nc.jetstream().add_stream(name=ns, subjects=[f"{ns}.>"], storage="file")
    finally:
        await nc.close()


async def nats_side(cfg: Config, side: str) -> Row:
    """``side``: ``raw``, ``faststream`` (push subscribers) or ``faststream-pull``."""
    ns = fresh_namespace("w2n")
    await _create_stream(ns)
    try:
        async with processes(cfg.workdir / f"w2-{side}") as procs:
            services = []
            for name, source, target in HOPS:
                args: dict[str, Any] = {
                    "url": NATS_URL, "ns": ns, "name": name, "source": source, "target": target,
                }  # fmt: skip
                if side == "raw":
                    target_fn = "benchmarks.w2_services:raw_service"
                else:
                    target_fn = "benchmarks.w2_services:faststream_service"
                    args["pull"] = side == "faststream-pull"
                services.append(await procs.child(name, target_fn, args))
            for service in services:
                await service.message("ready", 60)
            client = await procs.child(
                "client", "benchmarks.w2_client:client", _client_args(cfg, "nats", NATS_URL, ns)
            )
            result = await _measure(cfg, client, services)
    finally:
        await cleanup("nats", ns)
    result["n"] = cfg.w2_transactions
    label = {
        "raw": "raw nats-py (continuous pull 500, batched acks)",
        "faststream": "FastStream (push subscribers)",
        "faststream-pull": "FastStream (pull subscribers, batch 100)",
    }[side]
    return _row("nats", label, result, baseline=side in ("raw", "faststream"))


async def choreograph_side(
    cfg: Config, transport: str, store: str, batch_size: int = 500, concurrency: int = 2
) -> Row:
    """``store``: ``memory`` (messaging alone) or ``sqlite`` (a durable store per service)."""
    ns = fresh_namespace("w2c")
    url = framework_url(transport, ns, str(cfg.workdir / f"{ns}-bus.db"))
    store_url = "memory://" if store == "memory" else f"sqlite:///{cfg.workdir}/{ns}-{{service}}.db"
    try:
        async with processes(cfg.workdir / f"w2-choreograph-{transport}-{store}") as procs:
            services = []
            for name, _, _ in HOPS:
                argv = [
                    CHOREOGRAPH, "run", "--app", "benchmarks.w2_app:app", "--service", name,
                    "--transport", url, "--store", store_url,
                    "--batch-size", str(batch_size), "--concurrency", str(concurrency),
                ]  # fmt: skip
                label = f"w2-{transport}-{store}-{name}"
                services.append(await procs.spawn(name, service_argv(cfg.profile_dir, label, argv)))
            for service in services:
                await service.output_containing("running", 60)
            client = await procs.child(
                "client", "benchmarks.w2_client:client", _client_args(cfg, "choreograph", url, ns)
            )
            result = await _measure(cfg, client, services)
    finally:
        await cleanup(transport, ns)
    result["n"] = cfg.w2_transactions
    return _row(transport, f"choreograph ({store} stores)", result)
