"""The W2 client process: publishes ``OrderPlaced`` and times each ``OrderCompleted``.

Phase 1 (throughput): N orders published as fast as the bus takes them (batches of 500, publish
acks awaited per batch), while completions are counted; tx/s = N / (last completion - first
publish). Phase 2 (latency): open loop at a fixed rate; each order carries its *scheduled*
publish time, so a stalled publisher shows up as latency instead of hiding it.

The client speaks either raw nats-py (for the raw and FastStream sides, which share subjects
``<ns>.<EventType>`` of one stream) or the choreograph transport (for the choreograph sides).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

from benchmarks.child import emit
from benchmarks.harness import latency_summary

BATCH = 500


class NatsBus:
    def __init__(self, url: str, ns: str) -> None:
        self.url, self.ns = url, ns

    async def start(self) -> None:
        import nats

        from benchmarks.w1_raw import ContinuousPull, nats_durable

        self.nc = await nats.connect(self.url)
        self.js = self.nc.jetstream(publish_async_max_pending=4 * BATCH)
        await nats_durable(self.nc, self.ns, "client", f"{self.ns}.OrderCompleted")
        self.pull = ContinuousPull(self.nc, self.ns, "client")
        await self.pull.start()

    async def publish(self, orders: Sequence[dict[str, Any]]) -> None:
        subject = f"{self.ns}.OrderPlaced"
        futures = [await self.js.publish_async(subject, orjson.dumps(o)) for o in orders]
        await asyncio.gather(*futures)

    async def receive(self) -> list[dict[str, Any]]:
        msgs = await self.pull.next_batch(1.0)
        for msg in msgs:
            await msg.ack()
        return [orjson.loads(msg.data) for msg in msgs]

    async def close(self) -> None:
        await self.nc.close()


class ChoreographBus:
    def __init__(self, url: str) -> None:
        from choreograph import transport_from_url

        self.transport = transport_from_url(url)

    async def start(self) -> None:
        await self.transport.connect()
        self.subscription = await self.transport.subscribe("client", ["OrderCompleted"])

    async def publish(self, orders: Sequence[dict[str, Any]]) -> None:
        from choreograph.envelope import Envelope, encode, new_id
        from choreograph.transport import Message

        messages = []
        for order in orders:
            event_id = new_id()
            envelope = Envelope(
                id=event_id, type="OrderPlaced", source="client", correlationid=event_id,
                data=order,
            )  # fmt: skip
            messages.append(Message(event_id, "OrderPlaced", encode(envelope)))
        await self.transport.publish(messages)

    async def receive(self) -> list[dict[str, Any]]:
        from choreograph.envelope import decode

        deliveries = await self.subscription.receive(BATCH, 1.0)
        if deliveries:
            await self.subscription.ack(deliveries)
        return [decode(d.message.body).data for d in deliveries]

    async def close(self) -> None:
        await self.subscription.close()
        await self.transport.close()


def order(phase: str, seq: int, sent_at: float) -> dict[str, Any]:
    return {
        "order_id": f"{phase}-{seq}-{uuid.uuid4().hex[:12]}",
        "customer": f"customer-{seq % 1000}",
        "amount": 10.0 + seq % 90,
        "sent_at": sent_at,
    }


class Receiver:
    """Counts completions per phase and records their latency."""

    def __init__(self, bus: NatsBus | ChoreographBus) -> None:
        self.bus = bus
        self.counts: dict[str, int] = {}
        self.latencies: dict[str, list[float]] = {}
        self.last: dict[str, float] = {}
        self.changed = asyncio.Event()

    async def run(self) -> None:
        while True:
            docs = await self.bus.receive()
            now = time.time()
            for doc in docs:
                phase = doc["order_id"].split("-", 1)[0]
                self.counts[phase] = self.counts.get(phase, 0) + 1
                self.latencies.setdefault(phase, []).append(now - doc["sent_at"])
                self.last[phase] = now
            if docs:
                self.changed.set()

    async def wait(self, phase: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.counts.get(phase, 0) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{phase}: {self.counts.get(phase, 0)} of {count} completed")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 1.0)


async def client(
    bus: str, url: str, ns: str, n: int, rate: float, seconds: float, timeout: float
) -> None:
    the_bus = NatsBus(url, ns) if bus == "nats" else ChoreographBus(url)
    await the_bus.start()
    receiver = Receiver(the_bus)
    receiving = asyncio.create_task(receiver.run())
    emit("ready")

    # phase 1: throughput
    emit("throughput_start")
    t_start = time.time()
    for start in range(0, n, BATCH):
        now = time.time()
        await the_bus.publish([order("t", s, now) for s in range(start, min(n, start + BATCH))])
    t_published = time.time()
    await receiver.wait("t", n, timeout)
    emit("throughput_end")
    tx_rate = n / (receiver.last["t"] - t_start)

    # phase 2: open-loop latency
    total = int(rate * seconds)
    t0 = time.time() + 0.05
    sent = 0
    while sent < total:
        due = min(total, int((time.time() - t0) * rate) + 1)
        if due > sent:
            await the_bus.publish([order("l", s, t0 + s / rate) for s in range(sent, due)])
            sent = due
        delay = t0 + sent / rate - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
    await receiver.wait("l", total, timeout)
    latency_seconds = time.time() - t0
    p50, p99 = latency_summary(receiver.latencies["l"])
    emit(
        "result",
        tx_rate=tx_rate,
        publish_rate=n / (t_published - t_start),
        p50_ms=p50,
        p99_ms=p99,
        latency_count=total,
        latency_seconds=latency_seconds,
        rate=rate,
        max_ms=max(receiver.latencies["l"]) * 1000,
    )
    receiving.cancel()
    await the_bus.close()
