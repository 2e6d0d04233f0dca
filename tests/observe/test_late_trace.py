"""A late event (its transaction had already ended) is visible in ``choreograph trace``."""

from __future__ import annotations

import asyncio
import json

from click.testing import CliRunner, Result

from choreograph.cli import main
from tests.observe.conftest import Recorded, place, wait_for

APP = "tests.observe.shop:app"


async def trace(db_url: str, *options: str) -> Result:
    """``choreograph trace o-late`` (in a thread: the command runs its own event loop)."""
    runner = CliRunner(env={"COLUMNS": "200"})
    args = ["trace", "o-late", "--db", db_url, "--app", APP, *options]
    return await asyncio.to_thread(runner.invoke, main, args, catch_exceptions=False)


async def test_trace_shows_a_request_that_arrived_after_its_order_failed(
    recorded: Recorded,
) -> None:
    # given an order that failed (payment declines it) and was compensated
    await place(recorded.runtime, "o-late", sku="declined")
    await recorded.ended("o-late")
    # when the order is placed again in the same transaction (a client retrying)
    await place(recorded.runtime, "o-late", sku="ok")

    async def late_recorded() -> bool:
        rows = await recorded.recorder.db.fetch(
            "SELECT service FROM cg_handlings WHERE correlation_id = 'o-late' AND outcome = 'late'"
        )
        return {r["service"] for r in rows} >= {"stock", "payment"}

    await wait_for(late_recorded)
    await recorded.settled()
    # then the trace shows both services settled it as late, and nothing ran again
    out = (await trace(recorded.db_url)).output
    assert "stock.reserve  ⌛ late" in out, out
    assert "payment.charge  ⌛ late" in out, out
    assert "the transaction already ended with OrderFailed" in out
    view = json.loads((await trace(recorded.db_url, "--json")).output)
    handled = [(h["service"], h["outcome"]) for e in view["events"] for h in e["handlings"]]
    assert handled.count(("stock", "late")) == 1 and handled.count(("payment", "late")) == 1
    assert view["status"] == "failed"
