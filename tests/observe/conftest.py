"""Fixtures of the observe tests: run the shop app in memory and wait for transactions to end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from choreograph import Runtime, transport_from_url
from choreograph.observe.recorder import Recorder, RecorderMiddleware
from choreograph.transports.memory import MemoryTransport
from tests.observe.shop import OrderPlaced, build_app
from tests.support.quiet import wait_until_quiet


async def place(runtime: Runtime, order_id: str, sku: str = "ok", amount: float = 10.0) -> None:
    async with runtime.unit_of_work("shop", correlation_id=order_id) as uow:
        uow.emit(OrderPlaced(order_id=order_id, sku=sku, amount=amount))


async def wait_for(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting for a condition")
        await asyncio.sleep(0.02)


@dataclass
class Recorded:
    """A shop runtime with the recorder middleware, and a recorder writing to ``db_url``."""

    runtime: Runtime
    recorder: Recorder
    db_url: str

    async def ended(self, *correlation_ids: str) -> None:
        """Wait until each transaction has its terminal event and its reports are recorded."""

        async def done() -> bool:
            rows = await self.recorder.db.fetch(
                "SELECT correlation_id FROM cg_transactions WHERE ended_at IS NOT NULL"
            )
            return set(correlation_ids) <= {r["correlation_id"] for r in rows}

        await wait_for(done)
        await self.settled()

    async def settled(self) -> None:
        """Wait until every handling is done and every report is in the database."""
        transport = self.recorder.transport
        assert isinstance(transport, MemoryTransport)
        await wait_until_quiet(self.runtime, transport)
        for mw in self.runtime.middleware:
            if isinstance(mw, RecorderMiddleware):
                await mw.flush()
        await wait_until_quiet(self.runtime, transport, groups=[self.recorder.group])
        await self.recorder.idle()


@pytest.fixture
async def recorded(tmp_path: Path) -> AsyncIterator[Recorded]:
    transport = transport_from_url("memory://")
    await transport.connect()
    db_url = f"sqlite:///{tmp_path}/flows.db"
    app = build_app()
    recorder = Recorder(app, transport, db_url, poll_interval=0.05)
    await recorder.start()
    runtime = Runtime(
        app,
        transport=transport,
        store="memory://",
        middleware=[RecorderMiddleware(flush_interval=0.05)],
    )
    async with runtime:
        yield Recorded(runtime, recorder, db_url)
    await recorder.stop()
