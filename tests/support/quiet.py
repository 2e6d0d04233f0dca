"""Wait until a runtime has nothing left to do: the event a test waits for instead of sleeping
"long enough" for compensations, trackers, reports or duplicates to happen."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from choreograph import Runtime
from choreograph.transport import Transport
from choreograph.transports.memory import MemoryTransport


async def wait_until_quiet(
    runtime: Runtime,
    transport: Transport | None = None,
    *,
    groups: Iterable[str] = (),
    timeout: float = 30.0,
) -> None:
    """Poll until no worker of ``runtime`` holds a message and no group (the runtime's services
    and ``groups``) has one waiting or set to be retried, on three checks in a row; on the memory
    bus, a message leased to a member outside the runtime (a recorder) counts too. Timers do not
    count. ``timeout`` only guards against a hang: it fails the test."""
    bus = transport if transport is not None else runtime.transport
    names = [*runtime.workers, *groups]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    quiet = 0
    while quiet < 3:
        waiting = {name: await bus.lag(name) or 0 for name in names}
        if isinstance(bus, MemoryTransport):
            waiting = {name: n + bus.busy(name) for name, n in waiting.items()}
        held = {name: w.inflight for name, w in runtime.workers.items() if w.inflight}
        busy = held or any(waiting.values())
        quiet = 0 if busy else quiet + 1
        if loop.time() > deadline:
            raise AssertionError(
                f"still busy after {timeout}s: in flight {held}, waiting {waiting}"
            )
        await asyncio.sleep(0.01)
