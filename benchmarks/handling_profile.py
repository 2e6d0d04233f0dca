"""Where one handling's time goes: ``python -m benchmarks.handling_profile [--n N] [--store URL]``.

In one process, on the ``memory://`` bus: N events are published for a service whose handler
emits one event (``relay``) and N for a service whose handler does nothing (``sink``); a Runtime
handles them, first plain (wall µs per handling), then under cProfile, whose cumulative time per
stage of the handling path is printed as µs per handling, scaled to the plain run's wall time
(the profiler's own overhead is spread in proportion). Stages overlap where one calls another:
each line says what it includes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

from choreograph import App, Context, Event, Runtime, Service, WorkerSettings
from choreograph.envelope import Envelope, encode, new_id
from choreograph.transport import Message
from choreograph.transports.memory import MemoryTransport


class Ping(Event):
    seq: int


class Pong(Event):
    seq: int


relay = Service("relay")
counts = {"handled": 0, "target": 0}
done: list[asyncio.Event] = []


@relay.on(Ping, emits=[Pong])
async def answer(event: Ping, ctx: Context) -> Pong:
    _count()
    return Pong(seq=event.seq)


sink = Service("sink")


@sink.on(Pong)
async def absorb(event: Pong, ctx: Context) -> None:
    _count()


def _count() -> None:
    counts["handled"] += 1
    if counts["handled"] >= counts["target"]:
        done[0].set()


app = App("profile", [relay, sink])

#: (label, module file, function, what it includes)
STAGES = (
    ("worker: one batch", "worker.py", "_process", "handle, commit, publish, settle"),
    ("  transactions", "worker.py", "_transact", "handle every message + commit"),
    ("    handle_batch", "handling.py", "handle_batch", "lookups and handlings of a batch"),
    ("      decode", "envelope.py", "decode", "envelope.decode"),
    ("      validate", "events.py", "parse_data", "pydantic validation of data"),
    ("      inbox lookup", "sqlite.py", "seen", "StoreTx.seen, one per message"),
    ("      inbox lookup", "sqlite.py", "seen_many", "StoreTx.seen_many, one per batch"),
    ("      savepoint", "sqlite.py", "savepoint", "SAVEPOINT/RELEASE"),
    ("      hooks.handle", "hooks.py", "handle", "middleware chain, log fields, react"),
    ("        react", "handling.py", "_react", "routes, handler"),
    ("      emit", "handling.py", "_emit", "envelope + encode + outbox row"),
    ("        encode", "envelope.py", "encode", "envelope.encode"),
    ("    commit", "sqlite.py", "flush", "batched inbox/outbox INSERTs"),
    ("  publish", "worker.py", "_publish", "fast-path publish after commit"),
    ("  settle", "worker.py", "_settle", "ack"),
    ("receive", "memory.py", "receive", "the memory bus' receive"),
    ("housekeeping", "worker.py", "_housekeeping", "mark sent, timers, relay"),
)


async def _run(n: int, store: str, batch: int) -> float:
    transport = MemoryTransport()
    counts["handled"], counts["target"] = 0, 2 * n
    done[:] = [asyncio.Event()]
    settings = WorkerSettings(batch_size=batch)
    runtime = Runtime(app, transport=transport, store=store, settings=settings)
    await transport.connect()
    from choreograph.runtime.runner import declare_groups

    await declare_groups(transport, app)
    bodies = []
    for seq in range(n):
        event_id = new_id()
        envelope = Envelope(event_id, Ping.event_type, "profile", event_id, {"seq": seq})
        bodies.append(Message(event_id, Ping.event_type, encode(envelope)))
    for start in range(0, n, 500):
        await transport.publish(bodies[start : start + 500])
    t0 = time.perf_counter()
    async with runtime:
        await done[0].wait()
        elapsed = time.perf_counter() - t0
    return elapsed


def _cumulative(stats: pstats.Stats, module: str, name: str) -> float:
    entries = stats.stats.items()  # type: ignore[attr-defined]
    return sum(
        ct for (path, _line, func), (_cc, _nc, _tt, ct, _) in entries
        if func == name and path.endswith(module)
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000, help="Ping events (and as many Pongs)")
    parser.add_argument("--store", default="memory://")
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(_run(2000, args.store, args.batch))  # warm up
    walls = [asyncio.run(_run(args.n, args.store, args.batch)) for _ in range(3)]
    wall = sorted(walls)[1]
    handlings = 2 * args.n
    per = wall / handlings * 1e6
    print(f"plain: {handlings / wall:,.0f} handlings/s, {per:.1f} µs wall per handling "
          f"(median of {', '.join(f'{handlings / w:,.0f}' for w in walls)})")  # fmt: skip
    profiler = cProfile.Profile()
    profiler.enable()
    profiled = asyncio.run(_run(args.n, args.store, args.batch))
    profiler.disable()
    stats = pstats.Stats(profiler)
    scale = wall / profiled
    print(f"profiled: {profiled / handlings * 1e6:.1f} µs per handling; figures below scaled "
          f"by {scale:.2f} to the plain run")  # fmt: skip
    for label, module, func, what in STAGES:
        seconds = _cumulative(stats, module, func)
        if seconds:
            print(f"{label:<28} {seconds * scale / handlings * 1e6:7.2f} µs   {what}")


if __name__ == "__main__":
    main()
