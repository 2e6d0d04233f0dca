"""The W3 driver process: puts ``DeliveryRequested`` straight onto the bus and times each outcome.

Deliveries enter the bus as ingestion would publish them (source ``ingestion``, the delivery id as
correlation id), in batches of 200, without the HTTP API (the pure messaging figure). The outcome
is counted by a consumer group of its own on ``DeliveryCompleted`` and ``DeliveryFailed``.
Phase 1: N deliveries at once (deliveries/s); phase 2, once the driver says ``go`` (after the
services finished the work phase 1 left behind its terminal events): open loop at a fixed rate
(p50/p99 from the scheduled submission to the terminal event).
"""

from __future__ import annotations

import asyncio
import time

from benchmarks.child import emit, wait_for_stdin_line
from benchmarks.harness import latency_summary
from choreograph import transport_from_url
from choreograph.demo.runner import sample_request
from choreograph.envelope import Envelope, encode
from choreograph.transport import Message

BATCH = 200
TERMINAL = ("DeliveryCompleted", "DeliveryFailed")


async def client(url: str, n: int, rate: float, seconds: float, timeout: float) -> None:
    transport = transport_from_url(url)
    await transport.connect()
    subscription = await transport.subscribe("bench-counter", TERMINAL)
    scheduled: dict[str, float] = {}
    outcomes: dict[str, int] = {}
    latencies: list[float] = []
    done: dict[str, float] = {}
    all_ended = asyncio.Event()

    async def count() -> None:
        from choreograph.envelope import decode

        while True:
            deliveries = await subscription.receive(500, 1.0)
            now = time.time()
            for delivery in deliveries:
                envelope = decode(delivery.message.body)
                delivery_id = envelope.data["delivery_id"]
                at = scheduled.pop(delivery_id, None)
                if at is None:
                    continue  # a duplicate
                outcomes[envelope.type] = outcomes.get(envelope.type, 0) + 1
                done[delivery_id] = now
                if delivery_id.startswith("l"):
                    latencies.append(now - at)
            if deliveries:
                await subscription.ack(deliveries)
            if not scheduled:
                all_ended.set()

    async def submit(first: int, last: int, phase: str, at: float | None) -> None:
        messages = []
        for number in range(first, last):
            doc = sample_request(number)
            delivery_id = f"{phase}{doc['delivery_id']}"
            doc["delivery_id"] = delivery_id
            scheduled[delivery_id] = at + number / rate if at is not None else time.time()
            envelope = Envelope(
                id=f"req-{delivery_id}", type="DeliveryRequested", source="ingestion",
                correlationid=delivery_id, data=doc,
            )  # fmt: skip
            messages.append(Message(envelope.id, envelope.type, encode(envelope)))
        await transport.publish(messages)

    async def wait_all() -> None:
        deadline = time.monotonic() + timeout
        while scheduled:
            all_ended.clear()
            try:
                await asyncio.wait_for(all_ended.wait(), deadline - time.monotonic())
            except TimeoutError:
                left = len(scheduled)
                raise TimeoutError(f"{left} deliveries did not end within {timeout:.0f}s") from None

    counting = asyncio.create_task(count())
    emit("ready")
    emit("throughput_start")
    t_start = time.time()
    for first in range(0, n, BATCH):
        await submit(first, min(n, first + BATCH), "t", None)
    await wait_all()
    elapsed = max(done.values()) - t_start
    emit("throughput_end")
    result = {"rate": n / elapsed, "outcomes": dict(outcomes)}

    total = int(rate * seconds)
    if total:
        await wait_for_stdin_line()
        emit("latency_start")
        t0 = time.time() + 0.05
        sent = 0
        while sent < total:
            due = min(total, int((time.time() - t0) * rate) + 1)
            if due > sent:
                await submit(sent, due, "l", t0)
                sent = due
            delay = t0 + sent / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await wait_all()
        result["p50_ms"], result["p99_ms"] = latency_summary(latencies)
        result["max_ms"] = max(latencies) * 1000
        result["outcomes"] = dict(outcomes)
    emit("result", **result)
    counting.cancel()
    await subscription.close()
    await transport.close()
