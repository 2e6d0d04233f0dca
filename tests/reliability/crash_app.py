"""A service whose side effects can be counted, and a middleware that kills its own process at a
chosen point of the handling path (env CRASH_AT=handled|committed|published, CRASH_ON_BATCH=N)."""

from __future__ import annotations

import os
import signal

from choreograph import App, Context, Event, Middleware, Service
from choreograph.middleware import Checkpoint


class Add(Event):
    account: str
    amount: int


class Added(Event):
    account: str
    amount: int


ledger = Service("ledger")


@ledger.on(Add, emits=[Added])
async def add(event: Add, ctx: Context) -> Added:
    doc = await ctx.state.get("account", event.account) or {"total": 0, "applied": []}
    doc["total"] += event.amount
    doc["applied"].append(ctx.event_id)  # a side effect applied twice would show here twice
    await ctx.state.put("account", event.account, doc)
    return Added(account=event.account, amount=event.amount)


app = App("ledger", [ledger])


class CrashAt(Middleware):
    """SIGKILL this process when the ``batch``-th batch reaches ``point``."""

    def __init__(self, point: str, batch: int) -> None:
        self.point = point
        self.batch = batch
        self.seen = 0

    def checkpoint(self, service: str, point: Checkpoint) -> None:
        if point != self.point:
            return
        self.seen += 1
        if self.seen >= self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def crash_middleware() -> list[Middleware]:
    point = os.environ.get("CRASH_AT", "")
    return [CrashAt(point, int(os.environ.get("CRASH_ON_BATCH", "2")))] if point else []
