"""A group member in its own OS process, for the crash test.

Usage: ``python -m tests.conformance._member URL GROUP TOPIC LEASE COUNT``

Connects, subscribes, receives COUNT messages without settling them, prints their ids (one a
line), then ``holding``, and blocks until killed.
"""

from __future__ import annotations

import asyncio
import sys

from choreograph.transport import Delivery, transport_from_url


async def main(url: str, group: str, topic: str, lease: float, count: int) -> None:
    transport = transport_from_url(url)
    await transport.connect()
    sub = await transport.subscribe(group, [topic], lease=lease)
    print("subscribed", flush=True)
    held: list[Delivery] = []
    while len(held) < count:
        held += await sub.receive(count - len(held), 1.0)
    for delivery in held:
        print(delivery.message.id, flush=True)
    print("holding", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    url, group, topic, lease, count = sys.argv[1:6]
    asyncio.run(main(url, group, topic, float(lease), int(count)))
