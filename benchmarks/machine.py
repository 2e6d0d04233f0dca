"""What the figures were measured on: CPU, Python, library and broker versions, machine load."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import sqlite3
import subprocess
import time
from pathlib import Path

from benchmarks.brokers import AMQP_URL, NATS_URL, REDIS_URL, is_up


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def busy_share(seconds: float = 1.0) -> float:
    """Share (0..1) of the machine's CPU time that was busy over ``seconds``."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


async def _nats_version() -> str:
    import nats

    nc = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
    try:
        version = nc.connected_server_version
        return f"{version.major}.{version.minor}.{version.patch}"
    finally:
        await nc.close()


async def _redis_version() -> str:
    from redis.asyncio import Redis

    r = Redis.from_url(REDIS_URL)
    try:
        info = await r.info("server")
        return str(info["redis_version"])
    finally:
        await r.aclose()


async def _rabbitmq_version() -> str:
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL, timeout=5)
    try:
        properties = connection.transport.connection.server_properties  # type: ignore[union-attr]
        version = properties.get("version", "?")
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        await connection.close()


async def broker_versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name, probe in (
        ("nats", _nats_version),
        ("redis", _redis_version),
        ("amqp", _rabbitmq_version),
    ):
        if not is_up(name):
            found[name] = "down"
            continue
        try:
            found[name] = await asyncio.wait_for(probe(), 10)
        except Exception as exc:
            found[name] = f"unknown ({type(exc).__name__})"
    return found


def git_revision() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip()
    return "?"


async def describe() -> dict[str, str]:
    brokers = await broker_versions()
    busy = await asyncio.to_thread(busy_share, 1.0)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpus": f"{os.cpu_count()} x {cpu_model()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": platform.platform(),
        "brokers": (
            f"nats-server {brokers['nats']}, RabbitMQ {brokers['amqp']}, "
            f"Redis {brokers['redis']}, SQLite {sqlite3.sqlite_version}"
        ),
        "clients": ", ".join(
            f"{p} {_version(p)}"
            for p in ("nats-py", "redis", "aio-pika", "faststream", "orjson", "pydantic")
        ),
        "choreograph": f"{_version('choreograph')} (git {git_revision()})",
        "load_before": f"load average {load_average()}, machine {busy:.0%} busy just before",
    }
