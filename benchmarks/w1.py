"""W1 — one hop: a producer process publishes N events, a consumer process acks each one."""

from __future__ import annotations

import asyncio
from typing import Any

from benchmarks.brokers import BROKER_URLS, cleanup, framework_url, fresh_namespace
from benchmarks.config import Config
from benchmarks.harness import Row, processes
from benchmarks.profiling import child_env

RAW = "benchmarks.w1_raw"
FRAMEWORK = "benchmarks.w1_framework"


async def _pair(
    cfg: Config,
    label: str,
    consumer: tuple[str, dict[str, Any]],
    producer: tuple[str, dict[str, Any]],
    profile: bool = False,
) -> dict[str, float]:
    n = cfg.w1_events
    timeout = 60 + n / 500
    async with processes(cfg.workdir / label) as procs:
        profile_dir = cfg.profile_dir if profile else None
        env = child_env(profile_dir, f"{label}-consumer")
        cons = await procs.child("consumer", consumer[0], consumer[1], env)
        await cons.message("ready", 60)
        env = child_env(profile_dir, f"{label}-producer")
        prod = await procs.child("producer", producer[0], producer[1], env)
        produced = await prod.message("result", timeout)
        consumed = await cons.message("result", timeout)
        await asyncio.gather(prod.exited(10), cons.exited(10))
    elapsed = consumed["t_end"] - produced["t_start"]
    return {
        "rate": n / elapsed,
        "elapsed": elapsed,
        "cpu_producer": produced["cpu"],
        "cpu_consumer": consumed["cpu"],
        "publish_rate": n / (produced["t_end"] - produced["t_start"]),
    }


def _row(transport: str, side: str, figures: dict[str, float], *, baseline: bool = False) -> Row:
    cpu_p, cpu_c = figures["cpu_producer"], figures["cpu_consumer"]
    return Row(
        "W1 one hop",
        transport,
        side,
        rate=figures["rate"],
        cpu_s=cpu_p + cpu_c,
        cpu_detail=f"producer {cpu_p:.2f} / consumer {cpu_c:.2f}",
        baseline=baseline,
        extra=figures,
    )


async def raw(cfg: Config, transport: str, queue_type: str = "classic") -> Row:
    ns = fresh_namespace("w1r")
    n = cfg.w1_events
    if transport == "sqlite":
        path = str(cfg.workdir / f"{ns}.db")
        args: dict[str, Any] = {"path": path, "n": n}
    else:
        args = {"url": BROKER_URLS[transport], "ns": ns, "n": n}
        if transport == "amqp":
            args["queue_type"] = queue_type
    try:
        figures = await _pair(
            cfg,
            f"w1-raw-{transport}-{queue_type}",
            (f"{RAW}:{transport}_consumer", args),
            (f"{RAW}:{transport}_producer", args),
        )
    finally:
        await cleanup(transport, ns)
    side = RAW_SIDES[transport]
    if transport == "amqp" and queue_type != "classic":
        side = f"raw aio-pika, {queue_type} queue"
    return _row(transport, side, figures, baseline=queue_type == "classic")


RAW_SIDES = {
    "nats": "raw nats-py (continuous pull 500)",
    "redis": "raw redis-py (XREADGROUP 500)",
    "amqp": "raw aio-pika (prefetch 500)",
    "sqlite": "raw sqlite3 (claim 100)",
}


async def framework(cfg: Config, transport: str, level: str) -> Row:
    """``level`` is ``transport`` (the bus contract alone) or ``runtime`` (a full service)."""
    ns = fresh_namespace("w1c")
    url = framework_url(transport, ns, str(cfg.workdir / f"{ns}.db"))
    n = cfg.w1_events
    consumer_fn = "consumer" if level == "transport" else "runtime_consumer"
    try:
        figures = await _pair(
            cfg,
            f"w1-{level}-{transport}",
            (f"{FRAMEWORK}:{consumer_fn}", {"url": url, "n": n}),
            (f"{FRAMEWORK}:producer", {"url": url, "n": n}),
            profile=True,
        )
    finally:
        await cleanup(transport, ns)
    side = (
        "choreograph transport (publish/receive/ack 500)"
        if level == "transport"
        else "choreograph Runtime (no-op service, memory store)"
    )
    return _row(transport, side, figures)
