"""The W2 services without choreograph: raw nats-py, and FastStream (push or pull subscribers).

Each one reads ``<ns>.<input>`` from the stream ``<ns>`` through its own durable consumer and
publishes ``<ns>.<output>`` carrying the same JSON document; it acknowledges its input only after
its output is durably published, as choreograph does.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import orjson

from benchmarks.child import emit

BATCH = 500


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def raw_service(url: str, ns: str, name: str, source: str, target: str) -> None:
    """Continuous pull of 500; publish the batch's outputs, gather their acks, ack the inputs."""
    import nats

    from benchmarks.w1_raw import ContinuousPull, nats_durable

    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4 * BATCH)
    await nats_durable(nc, ns, name, f"{ns}.{source}")
    pull = ContinuousPull(nc, ns, name)
    await pull.start()
    subject = f"{ns}.{target}"

    async def serve() -> None:
        while True:
            msgs = await pull.next_batch(1.0)
            if not msgs:
                continue
            futures = []
            for msg in msgs:
                doc = orjson.loads(msg.data)
                futures.append(await js.publish_async(subject, orjson.dumps(doc)))
            await asyncio.gather(*futures)
            for msg in msgs:
                await msg.ack()

    serving = asyncio.create_task(serve())
    emit("ready")
    await _until_signalled()
    serving.cancel()
    await nc.close()


async def faststream_service(
    url: str, ns: str, name: str, source: str, target: str, pull: bool = False
) -> None:
    from faststream.nats import JStream, NatsBroker, PullSub

    broker = NatsBroker(url, logger=None)
    stream = JStream(name=ns, declare=False)
    publisher = broker.publisher(f"{ns}.{target}", stream=stream)
    options: dict[str, Any] = {"stream": stream, "durable": name}
    if pull:
        options["pull_sub"] = PullSub(batch_size=100)

    @broker.subscriber(f"{ns}.{source}", **options)
    @publisher
    async def handle(doc: dict[str, Any]) -> dict[str, Any]:
        return doc

    await broker.start()
    emit("ready")
    await _until_signalled()
    await broker.stop()
