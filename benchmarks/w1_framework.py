"""W1 through choreograph: the transport contract alone, and the full runtime.

* ``transport``: ``transport_from_url`` + ``publish`` in batches of 500 on one side,
  ``subscribe`` / ``receive(500)`` / ``ack`` on the other: the bus adapter's own cost.
* ``runtime``: the same producer, and a :class:`~choreograph.Runtime` running a service whose
  handler does nothing (decode, validate, inbox, one store transaction per batch, settle): what a
  user's service pays on top of the bus. Its store is ``memory://`` unless told otherwise.
"""

from __future__ import annotations

import asyncio
import time

from benchmarks import payload
from benchmarks.child import Meter, cpu_now, emit
from choreograph import Runtime, WorkerSettings, transport_from_url
from choreograph.transport import Message

BATCH = 500


async def producer(url: str, n: int, batch: int = BATCH) -> None:
    messages = [Message(i, payload.Tick.event_type, b) for i, b in payload.tick_bodies(n)]
    transport = transport_from_url(url)
    await transport.connect()
    emit("ready")
    meter = Meter()
    for start in range(0, n, batch):
        await transport.publish(messages[start : start + batch])
    emit("result", t_start=meter.start, t_end=time.time(), cpu=meter.cpu())
    await transport.close()


async def consumer(url: str, n: int, batch: int = BATCH) -> None:
    transport = transport_from_url(url)
    await transport.connect()
    subscription = await transport.subscribe("sink", [payload.Tick.event_type])
    emit("ready")
    count, meter = 0, None
    while count < n:
        deliveries = await subscription.receive(batch, 5.0)
        if not deliveries:
            continue
        meter = meter or Meter()
        await subscription.ack(deliveries)
        count += len(deliveries)
    assert meter is not None
    emit("result", t_first=meter.start, t_end=time.time(), cpu=meter.cpu(), count=count)
    await subscription.close()
    await transport.close()


async def runtime_consumer(
    url: str, n: int, batch: int = BATCH, concurrency: int = 2, store: str = "memory://"
) -> None:
    settings = WorkerSettings(batch_size=batch, concurrency=concurrency)
    runtime = Runtime(payload.sink_app, transport=url, store=store, settings=settings)
    async with runtime:
        worker = runtime.worker("sink")
        payload.progress.target = n
        emit("ready")
        await payload.progress.first.wait()
        t_first, cpu_first = time.time(), cpu_now()
        await payload.progress.reached.wait()
        while worker.inflight:  # noqa: ASYNC110 - the last batch is being settled
            await asyncio.sleep(0.001)
        t_end, cpu = time.time(), cpu_now() - cpu_first
        count = payload.progress.handled
        emit("result", t_first=t_first, t_end=t_end, cpu=cpu, count=count)
