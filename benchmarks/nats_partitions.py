"""What routing a key-partitioned NATS group costs, beside a plain group, in one run.

Run: .venv/bin/python -m benchmarks.nats_partitions [--events 4000] [--partitions 16] [--rounds 3]

One member of group ``g`` receives and acknowledges, in batches of 500, ``events`` events of 200
keys that one publisher sends in batches of 500 (NATS on 127.0.0.1:4222, a namespace of its
own, deleted afterwards). Rounds alternate plain and partitioned; events/s is counted from the
first publish to the last acknowledgement, and the median of the rounds is printed for each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from benchmarks.machine import load_average
from choreograph.envelope import encode, new_envelope
from choreograph.transport import Message
from choreograph.transports.nats import NatsTransport

BATCH = 500
KEYS = 200


def _events(count: int) -> list[Message]:
    messages = []
    for i in range(count):
        envelope = new_envelope("T", {"n": i}, source="bench", correlation_id=f"tx{i % KEYS}")
        messages.append(Message(envelope.id, "T", encode(envelope)))
    return messages


async def one_round(events: int, partitions: int) -> float:
    """Events/s through one member; ``partitions`` 0 for a plain group."""
    url = f"nats://127.0.0.1:4222?namespace=npb{uuid.uuid4().hex[:8]}"
    if partitions:
        url += f"&partitioned=g&partitions={partitions}"
    publisher, consumer = NatsTransport.from_url(url), NatsTransport.from_url(url)
    await publisher.connect()
    await consumer.connect()
    try:
        subscription = await consumer.subscribe("g", ["T"])
        messages = _events(events)
        received = 0

        async def consume() -> None:
            nonlocal received
            while received < events:
                batch = await subscription.receive(BATCH, 1.0)
                await subscription.ack(batch)
                received += len(batch)

        start = time.perf_counter()
        task = asyncio.create_task(consume())
        for i in range(0, events, BATCH):
            await publisher.publish(messages[i : i + BATCH])
        await task
        return events / (time.perf_counter() - start)
    finally:
        await consumer.close()
        await publisher.delete_namespace()
        await publisher.close()


async def main_async(events: int, partitions: int, rounds: int) -> None:
    rates: dict[str, list[float]] = {"plain": [], "partitioned": []}
    for _ in range(rounds):
        rates["plain"].append(await one_round(events, 0))
        rates["partitioned"].append(await one_round(events, partitions))
    plain, parted = (statistics.median(rates[side]) for side in ("plain", "partitioned"))
    print(f"load average {load_average()}")
    for side, values in rates.items():
        print(f"{side}: {', '.join(f'{v:,.0f}' for v in values)} events/s")
    ratio = parted / plain
    print(f"median: plain {plain:,.0f}, partitioned ({partitions}) {parted:,.0f}: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main_async(args.events, args.partitions, args.rounds))


if __name__ == "__main__":
    main()
