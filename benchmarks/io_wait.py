"""A simulated I/O wait in the handlers of package and drone-scheduler, for the scale-out runs.

``choreograph run --middleware benchmarks.io_wait:from_env`` with ``BENCH_IO_WAIT_MS=5`` makes
every handling of those services ``await asyncio.sleep(0.005)`` inside its transaction, as a
handler awaiting a remote call would (the store's locks are held meanwhile). The demo app stays
as it is: the wait is a middleware around its handlers. ``BENCH_IO_WAIT_SERVICES`` (names,
comma-separated) slows other services instead, e.g. only ``drone-scheduler``.
"""

from __future__ import annotations

import asyncio
import os

from choreograph.context import Context
from choreograph.events import Event
from choreograph.middleware import Middleware, Next

ENV = "BENCH_IO_WAIT_MS"
SERVICES_ENV = "BENCH_IO_WAIT_SERVICES"
SERVICES = ("package", "drone-scheduler")


class IoWait(Middleware):
    """Waits ``seconds`` before every handler of ``services`` runs, inside its transaction."""

    def __init__(self, seconds: float, services: tuple[str, ...] = SERVICES) -> None:
        self.seconds = seconds
        self.services = frozenset(services)

    async def around_handle(self, ctx: Context, call_next: Next) -> list[Event]:
        if ctx.service in self.services:
            await asyncio.sleep(self.seconds)
        return await call_next()


def from_env() -> list[Middleware]:
    """The middleware ``BENCH_IO_WAIT_MS`` asks for (none when it is unset or 0)."""
    milliseconds = float(os.environ.get(ENV, "0") or 0)
    named = os.environ.get(SERVICES_ENV, "")
    services = tuple(n.strip() for n in named.split(",") if n.strip()) or SERVICES
    return [IoWait(milliseconds / 1000, services)] if milliseconds > 0 else []
