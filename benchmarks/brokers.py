"""Where the brokers listen, fresh names for each cell, and removing what a cell created."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import uuid
from typing import Any

log = logging.getLogger("benchmarks")

NATS_URL = "nats://127.0.0.1:4222"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"
PORTS = {"nats": 4222, "amqp": 5672, "redis": 6379, "postgres": 5432}
BROKER_URLS = {"nats": NATS_URL, "amqp": AMQP_URL, "redis": REDIS_URL}

#: Every name a benchmark creates on a broker starts with this, so leftovers of an interrupted
#: run are recognisable (and removed by the next run).
PREFIX = "chbench"


def fresh_namespace(tag: str) -> str:
    return f"{PREFIX}{uuid.uuid4().hex[:8]}{tag}"


def is_up(transport: str) -> bool:
    port = PORTS.get(transport)
    if port is None:
        return True
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def framework_url(transport: str, namespace: str, sqlite_path: str = "") -> str:
    if transport == "sqlite":
        return f"sqlite:///{sqlite_path}?namespace={namespace}"
    if transport == "memory":
        return "memory://"
    return f"{BROKER_URLS[transport]}?namespace={namespace}"


async def cleanup(transport: str, marker: str) -> None:
    """Delete every stream, queue, exchange or key whose name contains ``marker``."""
    try:
        if transport == "nats":
            await _cleanup_nats(marker)
        elif transport == "redis":
            await _cleanup_redis(marker)
        elif transport == "amqp":
            await _cleanup_amqp(marker)
    except Exception as exc:  # cleanup must never hide a result
        log.warning("cleanup of %s on %s failed: %s", marker, transport, exc)


async def _cleanup_nats(marker: str) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        jsm = nc.jsm()
        for info in await jsm.streams_info():
            if marker.lower() in info.config.name.lower():
                await jsm.delete_stream(info.config.name)
    finally:
        await nc.close()


async def _cleanup_redis(marker: str) -> None:
    from redis.asyncio import Redis

    r = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in r.scan_iter(match=f"*{marker}*", count=1000)]
        for start in range(0, len(keys), 500):
            await r.delete(*keys[start : start + 500])
    finally:
        await r.aclose()


def _rabbitmqctl(what: str) -> list[str]:
    result = subprocess.run(
        ["rabbitmqctl", what, "name", "-q", "--no-table-headers"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


async def _cleanup_amqp(marker: str) -> None:
    import aio_pika

    queues = [q for q in await asyncio.to_thread(_rabbitmqctl, "list_queues") if marker in q]
    exchanges = [e for e in await asyncio.to_thread(_rabbitmqctl, "list_exchanges") if marker in e]
    if not queues and not exchanges:
        return
    connection = await aio_pika.connect(AMQP_URL)
    try:
        for name in queues:
            channel: Any = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        for name in exchanges:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)
    finally:
        await connection.close()
