"""W1 raw-client baselines: a producer and a consumer process per broker, as the book describes.

* NATS JetStream: file stream, durable pull consumer, explicit ack; the producer gathers publish
  acks (``publish_async``); the consumer keeps pull requests of 500 open (a continuous pull).
* Redis Streams: pipelined XADD; XREADGROUP COUNT 500, one XACK per batch.
* RabbitMQ: durable queue, persistent messages, confirms awaited in windows of 500 (two windows
  in flight); the consumer
  has prefetch 500 and acks with ``multiple`` every 100 messages.
* SQLite: WAL, synchronous=NORMAL, inserts in transactions of 100, claims by
  ``UPDATE … RETURNING`` batches of 100, deletes on ack.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import deque
from typing import Any

from benchmarks.child import Meter, emit
from benchmarks.payload import tick_bodies

BATCH = 500


# NATS --------------------------------------------------------------------------------------------


class ContinuousPull:
    """Keeps pull requests open on a durable consumer and hands over whatever has arrived."""

    def __init__(self, nc: Any, stream: str, durable: str, batch: int = BATCH) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.batch = batch
        self.credit = 0
        self.buffer: deque[Any] = deque()
        self.ready = asyncio.Event()
        self.inbox = ""

    async def start(self) -> None:
        self.inbox = self.nc.new_inbox()
        await self.nc.subscribe(self.inbox, cb=self._on_msg, pending_msgs_limit=-1)
        await self._refill()

    async def _on_msg(self, msg: Any) -> None:
        headers = msg.headers
        if headers and "Status" in headers and not msg.data:
            status = headers["Status"]
            if status in ("408", "409"):  # request expired or ended: its credit is gone
                self.credit -= int(headers.get("Nats-Pending-Messages", 0) or 0)
                await self._refill()
            return
        self.credit -= 1
        self.buffer.append(msg)
        self.ready.set()

    async def _refill(self) -> None:
        while self.credit < self.batch:
            request = b'{"batch":%d,"expires":%d}' % (self.batch, 30_000_000_000)
            await self.nc.publish(self.subject, request, reply=self.inbox)
            self.credit += self.batch

    async def next_batch(self, timeout: float) -> list[Any]:
        if not self.buffer:
            self.ready.clear()
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except TimeoutError:
                return []
        out = []
        while self.buffer and len(out) < self.batch:
            out.append(self.buffer.popleft())
        await self._refill()
        return out


async def nats_setup(url: str, stream: str, subjects: list[str]) -> Any:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=subjects, storage="file")
    return nc


async def nats_durable(nc: Any, stream: str, durable: str, subject: str) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig

    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        filter_subject=subject,
        max_ack_pending=20_000,
        ack_wait=60,
    )
    await nc.jetstream().add_consumer(stream, config=config)


async def nats_consumer(url: str, ns: str, n: int) -> None:
    nc = await nats_setup(url, ns, [f"{ns}.>"])
    await nats_durable(nc, ns, "sink", f"{ns}.tick")
    pull = ContinuousPull(nc, ns, "sink")
    await pull.start()
    emit("ready")
    count, meter = 0, None
    while count < n:
        batch = await pull.next_batch(5.0)
        meter = meter or Meter()
        for msg in batch:
            await msg.ack()
        count += len(batch)
    await nc.flush()
    assert meter is not None
    emit("result", t_first=meter.start, t_end=time.time(), cpu=meter.cpu(), count=count)
    await nc.close()


async def nats_producer(url: str, ns: str, n: int) -> None:
    import nats

    bodies = [body for _, body in tick_bodies(n)]
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4 * BATCH)
    subject = f"{ns}.tick"
    emit("ready")
    meter = Meter()
    pending: deque[list[Any]] = deque()
    for start in range(0, n, BATCH):
        pending.append([await js.publish_async(subject, b) for b in bodies[start : start + BATCH]])
        if len(pending) > 2:
            await asyncio.gather(*pending.popleft())
    while pending:
        await asyncio.gather(*pending.popleft())
    emit("result", t_start=meter.start, t_end=time.time(), cpu=meter.cpu())
    await nc.close()


# Redis -------------------------------------------------------------------------------------------


async def redis_consumer(url: str, ns: str, n: int) -> None:
    from redis.asyncio import Redis

    r = Redis.from_url(url)
    key = f"{ns}:raw"
    await r.xgroup_create(key, "sink", id="0", mkstream=True)
    emit("ready")
    count, meter = 0, None
    while count < n:
        response = await r.xreadgroup("sink", "c1", {key: ">"}, count=BATCH, block=5000)
        if not response:
            continue
        meter = meter or Meter()
        ids = [entry_id for entry_id, _ in response[0][1]]
        await r.xack(key, "sink", *ids)
        count += len(ids)
    emit("result", t_first=meter.start, t_end=time.time(), cpu=meter.cpu(), count=count)
    await r.aclose()


async def redis_producer(url: str, ns: str, n: int) -> None:
    from redis.asyncio import Redis

    bodies = [body for _, body in tick_bodies(n)]
    r = Redis.from_url(url)
    key = f"{ns}:raw"
    await r.ping()
    emit("ready")
    meter = Meter()
    for start in range(0, n, BATCH):
        pipe = r.pipeline(transaction=False)
        for body in bodies[start : start + BATCH]:
            pipe.xadd(key, {"b": body})
        await pipe.execute()
    emit("result", t_start=meter.start, t_end=time.time(), cpu=meter.cpu())
    await r.aclose()


# RabbitMQ ----------------------------------------------------------------------------------------


def _queue_arguments(queue_type: str) -> dict[str, Any]:
    return {"x-queue-type": queue_type}


async def amqp_consumer(url: str, ns: str, n: int, queue_type: str = "classic") -> None:
    import aio_pika

    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=BATCH)
    queue = await channel.declare_queue(
        f"{ns}.raw", durable=True, arguments=_queue_arguments(queue_type)
    )
    emit("ready")
    count, meter = 0, None
    async with queue.iterator() as messages:
        async for message in messages:
            meter = meter or Meter()
            count += 1
            if count % 100 == 0 or count == n:
                await message.ack(multiple=True)
            if count >= n:
                break
    assert meter is not None
    emit("result", t_first=meter.start, t_end=time.time(), cpu=meter.cpu(), count=count)
    await connection.close()


async def amqp_producer(url: str, ns: str, n: int, queue_type: str = "classic") -> None:
    import aio_pika

    bodies = [body for _, body in tick_bodies(n)]
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    exchange = channel.default_exchange
    routing_key = f"{ns}.raw"
    emit("ready")
    meter = Meter()
    persistent = aio_pika.DeliveryMode.PERSISTENT
    windows: deque[asyncio.Future[Any]] = deque()
    for start in range(0, n, BATCH):
        windows.append(
            asyncio.gather(
                *(
                    exchange.publish(aio_pika.Message(b, delivery_mode=persistent), routing_key)
                    for b in bodies[start : start + BATCH]
                )
            )
        )
        if len(windows) > 1:  # two windows in flight: the broker never waits for us
            await windows.popleft()
    while windows:
        await windows.popleft()
    emit("result", t_start=meter.start, t_end=time.time(), cpu=meter.cpu())
    await connection.close()


# SQLite ------------------------------------------------------------------------------------------

SQLITE_BATCH = 100


def _sqlite(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=10)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


async def sqlite_consumer(path: str, n: int) -> None:
    db = _sqlite(path)
    db.executescript(
        "CREATE TABLE IF NOT EXISTS q (id INTEGER PRIMARY KEY, body BLOB NOT NULL,"
        " claimed INTEGER NOT NULL DEFAULT 0);"
        "CREATE INDEX IF NOT EXISTS q_claim ON q (claimed, id);"
    )
    emit("ready")
    count, meter = 0, None
    claim = (
        "UPDATE q SET claimed = 1 WHERE id IN "
        "(SELECT id FROM q WHERE claimed = 0 ORDER BY id LIMIT ?) RETURNING id, body"
    )
    while count < n:
        db.execute("BEGIN IMMEDIATE")
        rows = db.execute(claim, (SQLITE_BATCH,)).fetchall()
        db.execute("COMMIT")
        if not rows:
            await asyncio.sleep(0.001)
            continue
        meter = meter or Meter()
        ids = [row[0] for row in rows]
        db.execute("BEGIN IMMEDIATE")
        db.execute(f"DELETE FROM q WHERE id IN ({','.join('?' * len(ids))})", ids)
        db.execute("COMMIT")
        count += len(ids)
    assert meter is not None
    emit("result", t_first=meter.start, t_end=time.time(), cpu=meter.cpu(), count=count)
    db.close()


async def sqlite_producer(path: str, n: int) -> None:
    bodies = [body for _, body in tick_bodies(n)]
    db = _sqlite(path)
    emit("ready")
    meter = Meter()
    for start in range(0, n, SQLITE_BATCH):
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO q (body) VALUES (?)", ((b,) for b in bodies[start : start + SQLITE_BATCH])
        )
        db.execute("COMMIT")
    emit("result", t_start=meter.start, t_end=time.time(), cpu=meter.cpu())
    db.close()
