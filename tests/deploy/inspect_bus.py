"""What a bus holds for a namespace, read with each engine's own client (not the transport):
the objects ``choreograph declare`` makes, without their message counts, to compare two runs."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.commands import require_command


def namespace_of(url: str) -> str:
    return parse_qs(urlsplit(url).query).get("namespace", ["choreograph"])[0]


async def declared_objects(url: str, groups: list[str]) -> Any:
    """The streams, consumers, queues or tables of the bus at ``url`` and how they are set."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return _sqlite_objects(urlsplit(url).path)
    if scheme == "nats":
        return await _nats_objects(url)
    if scheme == "redis":
        return await _redis_objects(url)
    if scheme == "amqp":
        return await _amqp_objects(url, groups)
    raise ValueError(scheme)


def _sqlite_objects(path: str) -> Any:
    with sqlite3.connect(path) as db:
        tables = db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        rows = {
            name: sorted(db.execute(f'SELECT * FROM "{name}"').fetchall())
            for _, name, _ in tables
            if name.endswith(("_groups", "_bindings"))
        }
    return tables, rows


async def _nats_objects(url: str) -> Any:
    import nats

    namespace = namespace_of(url)
    nc = await nats.connect(url.split("?")[0])
    try:
        jsm = nc.jsm()
        found: dict[str, Any] = {}
        for stream in await jsm.streams_info():
            name = stream.config.name or ""
            if not name.startswith(namespace + "_"):
                continue
            found[name] = stream.config.as_dict()
            for consumer in await jsm.consumers_info(name):
                found[f"{name}/{consumer.name}"] = consumer.config.as_dict()
        return found
    finally:
        await nc.close()


async def _redis_objects(url: str) -> Any:
    import redis.asyncio as redis

    namespace = namespace_of(url)
    client = redis.Redis.from_url(url.split("?")[0])
    try:
        found: dict[str, Any] = {}
        async for key in client.scan_iter(match=f"{{{namespace}}}:*", count=500):
            kind = (await client.type(key)).decode()
            found[key.decode()] = kind
            if kind == "stream":
                found[key.decode() + "/groups"] = [
                    (g["name"], g["last-delivered-id"]) for g in await client.xinfo_groups(key)
                ]
        return found
    finally:
        await client.aclose()


async def _amqp_objects(url: str, groups: list[str]) -> Any:
    """Whether each group's queue exists (a passive declare), and every queue (with its type and
    arguments), exchange and binding of the namespace as ``rabbitmqctl`` lists them (AMQP itself
    cannot list them)."""
    import aiormq
    from aiormq import exceptions

    namespace = namespace_of(url)
    connection = await aiormq.connect(url.split("?")[0])
    found: dict[str, Any] = {}
    try:
        for group in groups:
            channel = await connection.channel()
            try:
                await channel.queue_declare(f"{namespace}.g.{group}", passive=True)
                found[group] = True
                await channel.close()
            except exceptions.ChannelNotFoundEntity:
                found[group] = False
    finally:
        await connection.close()
    ctl = require_command("rabbitmqctl")
    for what, columns in [
        ("list_queues", ["name", "type", "durable", "arguments"]),
        ("list_exchanges", ["name", "type", "durable", "arguments"]),
        ("list_bindings", ["source_name", "destination_name", "routing_key", "arguments"]),
    ]:
        listed = await asyncio.to_thread(
            subprocess.run, [ctl, "-q", what, *columns], capture_output=True, text=True, check=True
        )
        found[what] = sorted(line for line in listed.stdout.splitlines() if f"{namespace}." in line)
    return found


async def amqp_queue_depth(url: str, queue: str) -> int:
    """Ready messages in ``queue``, as KEDA's rabbitmq scaler reads it over AMQP (a passive
    queue declare's message count)."""
    import aiormq

    connection = await aiormq.connect(url.split("?")[0])
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(queue, passive=True)
        return int(ok.message_count or 0)
    finally:
        await connection.close()
