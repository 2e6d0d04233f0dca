"""Ordering per key: its cost, and whether it held, beside the same service unordered.

Run: .venv/bin/python -m benchmarks.ordering [--transport nats] [--store postgres] [--keys 200]
[--steps 10] [--io-ms 2] [--fail-rate 0.05] [--rounds 3]

One service in this process handles ``keys x steps`` events published beforehand (a backlog), in
four lanes of batches of 20: its handler waits ``io-ms`` (a simulated I/O wait) and fails a
``fail-rate`` share of first attempts (retried after 50 ms). Each round runs the service without
and with ``ordered_by`` side by side; the figures are the median of the rounds. "Keys out of
order" counts the keys whose steps were not handled in publish order.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid
from dataclasses import dataclass

from benchmarks.machine import cpu_model, load_average
from choreograph import (
    App,
    Context,
    Event,
    RetryLater,
    RetryPolicy,
    Runtime,
    Service,
    WorkerSettings,
)
from choreograph.envelope import Envelope, encode
from choreograph.transport import Message, transport_from_url

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
TRANSPORTS = {
    "sqlite": "sqlite:///{tmp}/bus.db",
    "nats": "nats://127.0.0.1:4222?namespace={ns}",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/?namespace={ns}",
    "redis": "redis://127.0.0.1:6379/0?namespace={ns}",
}


class Step(Event):
    order_id: str
    n: int


@dataclass
class Run:
    seconds: float
    cpu_seconds: float
    out_of_order: int
    retries: int


def build(ordered: bool, io_s: float, failing: set[tuple[str, int]], handled: list) -> App:
    service = Service("orders", retry=RetryPolicy(max_attempts=5, base_delay=0.05, jitter=0))

    @service.on(Step, ordered_by="order_id" if ordered else None)
    async def record(event: Step, ctx: Context) -> None:
        if io_s:
            await asyncio.sleep(io_s)
        if ctx.attempt == 1 and (event.order_id, event.n) in failing:
            raise RetryLater("transient", delay=0.05)
        handled.append((event.order_id, event.n))

    return App("ordering-bench", [service])


def events(keys: int, steps: int) -> list[Message]:
    out = []
    for n in range(steps):
        for k in range(keys):
            envelope = Envelope(
                id=str(uuid.uuid4()), type="Step", source="bench", correlationid=f"c{k}",
                data={"order_id": f"k{k}", "n": n},
            )  # fmt: skip
            out.append(Message(envelope.id, "Step", encode(envelope)))
    return out


async def drop_schemas(prefix: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(PG_URL)
    try:
        for row in await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)", prefix
        ):
            await conn.execute(f'DROP SCHEMA "{row["nspname"]}" CASCADE')
    finally:
        await conn.close()


async def run(args: argparse.Namespace, ordered: bool) -> Run:
    ns = "bo" + uuid.uuid4().hex[:10]
    tmp = f"/tmp/choreograph-bench-ordering-{ns}"
    await asyncio.to_thread(__import__("os").makedirs, tmp)
    url = TRANSPORTS[args.transport].format(ns=ns, tmp=tmp)
    store = (
        f"{PG_URL}?schema={ns}_{{service}}"
        if args.store == "postgres"
        else f"sqlite:///{tmp}/{{service}}.db"
    )
    rng = random.Random(11)
    failing = {
        (f"k{k}", n)
        for k in range(args.keys)
        for n in range(args.steps)
        if rng.random() < args.fail_rate
    }
    handled: list[tuple[str, int]] = []
    total = args.keys * args.steps
    app = build(ordered, args.io_ms / 1000, failing, handled)
    bus = transport_from_url(url)
    await bus.connect()
    try:
        await bus.declare_group("orders", ["Step"])
        backlog = events(args.keys, args.steps)
        for start in range(0, len(backlog), 200):
            await bus.publish(backlog[start : start + 200])
        runtime = Runtime(
            app,
            transport=url,
            store=store,
            settings=WorkerSettings(concurrency=4, batch_size=20),
        )
        cpu0, t0 = time.process_time(), time.perf_counter()
        async with runtime:
            while len(handled) < total:  # noqa: ASYNC110 - polls the handler's record
                await asyncio.sleep(0.01)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        await bus.delete_namespace()
        await bus.close()
        if args.store == "postgres":
            await drop_schemas(f"{ns}_")
    per_key: dict[str, list[int]] = {}
    for key, n in handled:
        per_key.setdefault(key, []).append(n)
    out_of_order = sum(1 for steps in per_key.values() if steps != sorted(steps))
    return Run(seconds, cpu, out_of_order, len(failing))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=sorted(TRANSPORTS), default="nats")
    parser.add_argument("--store", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--io-ms", type=float, default=2.0)
    parser.add_argument("--fail-rate", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    total = args.keys * args.steps
    print(f"# ordering per key: {args.transport} transport, {args.store} store, {args.keys} keys"
          f" x {args.steps} steps, io {args.io_ms} ms, fail rate {args.fail_rate}")  # fmt: skip
    print(f"# {cpu_model()}; load before: {load_average()}")
    runs: dict[bool, list[Run]] = {False: [], True: []}
    for _ in range(args.rounds):
        for ordered in (False, True):
            runs[ordered].append(await run(args, ordered))
    print(f"# load after: {load_average()}")
    print("| variant | events/s (median) | CPU ms per event | keys out of order (each round) |")
    print("|---|---|---|---|")
    rates = {}
    for ordered, found in runs.items():
        rates[ordered] = statistics.median(total / r.seconds for r in found)
        cpu = statistics.median(r.cpu_seconds / total * 1000 for r in found)
        wrong = ", ".join(f"{r.out_of_order}/{args.keys}" for r in found)
        name = "ordered_by=order_id" if ordered else "unordered"
        print(f"| {name} | {rates[ordered]:.0f} | {cpu:.2f} | {wrong} |")
    print(f"# ordered / unordered throughput: {rates[True] / rates[False]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
