"""CPU per handling of the demo's table services: ``python -m benchmarks.tables_cost [--n N]``.

In one process, on the ``memory://`` bus and a SQLite store (or ``--store URL``): package and
drone-scheduler (no transient errors, no rejections) each handle N ``DeliveryRequested`` and N
``DeliveryCompleted``, published in waves of 50 requests then their 50 completions (the fleet of
100 drones is never exhausted). Prints the process CPU time per handling (requests and
completions together) of each service, the run's whole runtime included (bus, store, commit),
then the same for a service whose handlers touch no table (``plain``), so the tables' share is
the difference, and for one whose handlers get and put a document of the delivery
(``documents``, like ingestion's). Each delivery's events carry its id as their correlation id,
as the demo's do.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable

from choreograph import App, Context, Middleware, Runtime, Service, WorkerSettings
from choreograph.demo import drone_scheduler, package
from choreograph.demo.events import (
    DeliveryCompleted,
    DeliveryRequested,
    Location,
    PackageInfo,
)
from choreograph.demo.knobs import Knobs
from choreograph.envelope import Envelope, encode, new_id
from choreograph.runtime.runner import declare_groups
from choreograph.transport import Message
from choreograph.transports.memory import MemoryTransport

WAVE = 50
KNOBS = Knobs(rejection_rate=0.0, transient_error_rate=0.0, fleet_size=2 * WAVE)


def _plain(knobs: Knobs) -> Service:
    plain = Service("plain")

    @plain.on(DeliveryRequested)
    async def requested(event: DeliveryRequested, ctx: Context) -> None:
        pass

    @plain.on(DeliveryCompleted)
    async def completed(event: DeliveryCompleted, ctx: Context) -> None:
        pass

    return plain


def _documents(knobs: Knobs) -> Service:
    documents = Service("documents")

    async def track(ctx: Context, delivery_id: str, status: str) -> None:
        doc = await ctx.state.get("delivery", delivery_id) or {}
        await ctx.state.put("delivery", delivery_id, {**doc, "status": status})

    @documents.on(DeliveryRequested)
    async def requested(event: DeliveryRequested, ctx: Context) -> None:
        await track(ctx, event.delivery_id, "requested")

    @documents.on(DeliveryCompleted)
    async def completed(event: DeliveryCompleted, ctx: Context) -> None:
        await track(ctx, event.delivery_id, "completed")

    return documents


class _Counter(Middleware):
    def __init__(self) -> None:
        self.handled = 0
        self.changed = asyncio.Event()

    async def around_handle(self, ctx: Context, call_next):  # type: ignore[no-untyped-def]
        emitted = await call_next()
        self.handled += 1
        self.changed.set()
        return emitted

    async def reach(self, count: int) -> None:
        while self.handled < count:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 30)


async def _publish(
    transport: MemoryTransport, events: list[DeliveryRequested | DeliveryCompleted]
) -> None:
    messages = []
    for event in events:
        event_id = new_id()
        data = event.model_dump(mode="json")
        envelope = Envelope(event_id, event.event_type, "tables-cost", event.delivery_id, data)
        messages.append(Message(event_id, event.event_type, encode(envelope)))
    await transport.publish(messages)


def _events(run: str, start: int) -> tuple[list[DeliveryRequested], list[DeliveryCompleted]]:
    here = Location(latitude=1.0, longitude=2.0)
    requests: list[DeliveryRequested] = []
    completions: list[DeliveryCompleted] = []
    for n in range(start, start + WAVE):
        d = f"d-{run}-{n}"  # (a store kept from an earlier run knows its deliveries ended)
        info = PackageInfo(package_id=f"p-{n}", size="small", weight_kg=2.0)
        requests.append(
            DeliveryRequested(delivery_id=d, owner_id="o", pickup=here, dropoff=here, package=info)
        )
        completions.append(DeliveryCompleted(delivery_id=d, drone_id="x", package_id=f"p-{n}"))
    return requests, completions


async def _run(build: Callable[[Knobs], Service], n: int, store: str) -> float:
    service = build(KNOBS)
    app = App("tables-cost", [service])
    transport = MemoryTransport()
    counter = _Counter()
    runtime = Runtime(
        app,
        transport=transport,
        store=store,
        middleware=[counter],
        settings=WorkerSettings(batch_size=WAVE),
    )
    await transport.connect()
    await declare_groups(transport, app)
    run = new_id()[:8]
    async with runtime:
        cpu = 0.0
        for wave in range(n // WAVE):
            requests, completions = _events(run, wave * WAVE)
            t0 = time.process_time()
            await _publish(transport, requests)
            await counter.reach((2 * wave + 1) * WAVE)
            await _publish(transport, completions)
            await counter.reach((2 * wave + 2) * WAVE)
            cpu += time.process_time() - t0
    return cpu / (2 * (n // WAVE) * WAVE) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="deliveries per service")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--store",
        default="",
        help="a store URL template with {service} (default: SQLite files in a temporary "
        "directory); e.g. postgresql://127.0.0.1/test?schema=tables_cost_{service}",
    )
    args = parser.parse_args()
    builds = {
        "package": package.build,
        "drone-scheduler": drone_scheduler.build,
        "plain": _plain,
        "documents": _documents,
    }
    results: dict[str, list[float]] = {name: [] for name in builds}
    for _ in range(args.rounds):
        for name, build in builds.items():
            with tempfile.TemporaryDirectory() as directory:
                store = args.store or f"sqlite:///{directory}/{{service}}.db"
                results[name].append(asyncio.run(_run(build, args.n, store)))
    for name, values in results.items():
        print(f"{name:<16} {sorted(values)[len(values) // 2]:7.0f} µs CPU per handling "
              f"(median of {', '.join(f'{v:.0f}' for v in values)})")  # fmt: skip


if __name__ == "__main__":
    main()
