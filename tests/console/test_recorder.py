"""The flow recorder, complete and poison-proof: real timer due times, late events, retention,
and messages it cannot record dead-lettered or skipped with a reason while it keeps consuming."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from choreograph import Runtime, transport_from_url
from choreograph.cli import main
from choreograph.demo import create_app
from choreograph.demo.events import DeliveryRequested
from choreograph.demo.knobs import Knobs
from choreograph.envelope import Envelope, encode, new_id
from choreograph.observe.flows import load_transaction
from choreograph.observe.model import FlowModel
from choreograph.observe.recorder import REPORTS_TOPIC, Recorder, RecorderMiddleware, prune
from choreograph.transport import Message, Transport
from tests.drone.conftest import request_body
from tests.observe.conftest import wait_for
from tests.observe.shop import build_app


def _deep_body(envelope: Envelope, depth: int) -> bytes:
    """The envelope's JSON with an extra data field nested ``depth`` levels deep (written as text:
    no JSON library serialises it, as a foreign producer's could)."""
    body = encode(envelope)
    nested = b'{"x":' * depth + b'"bottom"' + b"}" * depth
    return body.replace(b'"data":{', b'"data":{"extra":' + nested + b",", 1)


def _report(**changes: Any) -> dict[str, Any]:
    now = time.time()
    report = {
        "id": new_id(), "event_id": "e-1", "event_type": "OrderPlaced", "correlation_id": "o-1",
        "service": "stock", "handler": "reserve", "kind": "handler", "attempt": 1,
        "outcome": "done", "delay": None, "reason": None, "error_type": None, "error": None,
        "note": None, "emitted": [], "started": now, "ended": now,
    }  # fmt: skip
    return {**report, **changes}


def _message(envelope: Envelope) -> Message:
    return Message(envelope.id, envelope.type, encode(envelope, limit=1 << 24))


def _placed(order_id: str, **extra: Any) -> Envelope:
    data = {"order_id": order_id, "sku": "ok", "amount": 1.0, **extra}
    return Envelope(new_id(), "OrderPlaced", "shop", order_id, data)


@pytest.fixture
async def bus() -> AsyncIterator[Transport]:
    transport = transport_from_url("memory://")
    await transport.connect()
    yield transport
    await transport.close()


@pytest.fixture
async def recorder(bus: Transport, recorder_db_url: str) -> AsyncIterator[Recorder]:
    """A recorder consuming the bus into a fresh database (SQLite, then PostgreSQL)."""
    recorder = Recorder(build_app(), bus, recorder_db_url, poll_interval=0.05)
    await recorder.start()
    yield recorder
    await recorder.stop()


async def _transactions(recorder: Recorder) -> set[str]:
    rows = await recorder.db.fetch("SELECT correlation_id FROM cg_transactions")
    return {r["correlation_id"] for r in rows}


async def test_an_event_nested_300_deep_is_recorded_and_the_recorder_goes_on(
    bus: Transport, recorder: Recorder
) -> None:
    # given a valid event with an extra field nested 300 levels deep, then an ordinary one
    deep = _placed("o-deep")
    deep_message = Message(deep.id, deep.type, _deep_body(deep, 300))
    await bus.publish([deep_message, _message(_placed("o-after"))])

    # then both are recorded: the deep one with a note instead of its data
    await wait_for(lambda: _has(recorder, {"o-deep", "o-after"}))
    rows = await recorder.db.fetch("SELECT data FROM cg_events WHERE id = ?", (deep.id,))
    assert "data not recordable" in orjson.loads(rows[0]["data"])["_unrecorded"]


async def _has(recorder: Recorder, ids: set[str]) -> bool:
    return ids <= await _transactions(recorder)


async def test_a_report_with_an_impossible_attempt_is_skipped_with_its_reason(
    bus: Transport, recorder: Recorder
) -> None:
    # given one batch of reports: attempt 1e30, a string for a time, then a good one
    bad = _report(correlation_id="o-bad", attempt=1e30)
    worse = _report(correlation_id="o-worse", started="yesterday")
    good = _report(correlation_id="o-good")
    reports = Envelope(new_id(), REPORTS_TOPIC, "test", new_id(), {"reports": [bad, worse, good]})
    await bus.publish([_message(reports)])

    # then the good one is recorded and the bad ones are kept as rejects with their reasons
    await wait_for(lambda: _has(recorder, {"o-good"}))
    assert await _transactions(recorder) == {"o-good"}
    rejects = await recorder.db.fetch("SELECT reason FROM cg_rejects ORDER BY reason")
    assert [r["reason"] for r in rejects] == [
        "attempt 1e+30 is out of range",
        "started must be a time (epoch seconds)",
    ]

    # and the recorder keeps consuming afterwards
    await bus.publish([_message(_placed("o-later"))])
    await wait_for(lambda: _has(recorder, {"o-later"}))


async def test_a_message_that_is_not_an_envelope_is_dead_lettered(
    bus: Transport, recorder: Recorder
) -> None:
    # given garbage on a topic the recorder consumes, beside a valid event
    await bus.publish([Message(new_id(), "OrderPlaced", b"\x00not json")])
    await bus.publish([_message(_placed("o-valid"))])

    # then the valid event is recorded and the garbage is in the recorder's dead letters
    await wait_for(lambda: _has(recorder, {"o-valid"}))

    async def dead() -> bool:
        return bool(await bus.dead_letters(recorder.group))

    await wait_for(dead)
    (letter,) = await bus.dead_letters(recorder.group)
    assert letter.failure.reason == "not recordable"


async def test_retention_prunes_idle_transactions_only(recorder: Recorder) -> None:
    # given an old transaction and a recent one
    old, recent = _placed("o-old"), _placed("o-recent")
    old_time = "2020-01-01T00:00:00+00:00"
    batch = [_message(Envelope(old.id, old.type, old.source, "o-old", old.data, time=old_time))]
    await recorder.transport.publish([*batch, _message(recent)])
    await wait_for(lambda: _has(recorder, {"o-old", "o-recent"}))

    # when pruning keeps a day
    deleted = await prune(recorder.db, time.time() - 86_400)

    # then only the old one is gone, with its events and keys
    assert deleted == 1
    assert await _transactions(recorder) == {"o-recent"}
    left = await recorder.db.fetch("SELECT correlation_id FROM cg_events")
    assert {r["correlation_id"] for r in left} == {"o-recent"}


async def test_retention_runs_in_the_background(bus: Transport, tmp_path: Path) -> None:
    # given a recorder that keeps an hour, and an event from last year
    recorder = Recorder(build_app(), bus, f"sqlite:///{tmp_path}/flows.db", poll_interval=0.05,
                        retain=3600.0, prune_interval=0.05)  # fmt: skip
    await recorder.start()
    try:
        old = _placed("o-ancient")
        year_ago = "2025-01-01T00:00:00+00:00"
        ancient = Envelope(old.id, old.type, old.source, "o-ancient", old.data, time=year_ago)
        await bus.publish([_message(ancient), _message(_placed("o-fresh"))])
        # then the old transaction is pruned without anyone asking, the fresh one stays
        await wait_for(lambda: _has(recorder, {"o-fresh"}))
        await wait_for(lambda: recorder.pruned >= 1)
        assert await _transactions(recorder) == {"o-fresh"}
    finally:
        await recorder.stop()


async def test_a_step_that_ends_after_its_transaction_is_counted_late(recorder: Recorder) -> None:
    # given an order that started, then shipped (terminal), then a step caused by the start
    placed = _placed("o-late")
    shipped = Envelope(new_id(), "OrderShipped", "shipping", "o-late", {"order_id": "o-late"},
                       causationid=placed.id)  # fmt: skip
    await recorder.transport.publish([_message(placed), _message(shipped)])
    await wait_for(lambda: _has(recorder, {"o-late"}))
    await recorder.idle()
    stock = Envelope(new_id(), "StockReserved", "stock", "o-late", {"order_id": "o-late"},
                     causationid=placed.id)  # fmt: skip
    await recorder.transport.publish([_message(stock)])

    # then the transaction counts one late event
    async def late() -> bool:
        rows = await recorder.db.fetch("SELECT late FROM cg_transactions")
        return rows[0]["late"] == 1

    await wait_for(late)


# real timer due times ----------------------------------------------------------------------------


async def test_trace_shows_the_timer_the_service_really_set(tmp_path: Path) -> None:
    # given the delivery service running with a 300 s join timeout, a drone scheduler that never
    # answers, and the recorder
    db_url = f"sqlite:///{tmp_path}/flows.db"
    knobs = Knobs(rejection_rate=0.0, transient_error_rate=0.0, silent_drone_scheduler=True,
                  join_timeout=300.0)  # fmt: skip
    app = create_app(knobs)
    transport = transport_from_url("memory://")
    await transport.connect()
    recorder = Recorder(app, transport, db_url, poll_interval=0.05)
    await recorder.start()
    runtime = Runtime(app, transport=transport, store="memory://",
                      middleware=[RecorderMiddleware(flush_interval=0.05)])  # fmt: skip
    body = request_body(1)
    delivery_id = body["delivery_id"]
    try:
        async with runtime:
            started = time.time()
            await runtime.publish(
                DeliveryRequested(**body), source="ingestion", correlation_id=delivery_id
            )

            async def timer_recorded() -> bool:
                rows = await recorder.db.fetch(
                    "SELECT * FROM cg_timers WHERE correlation_id = ?", (delivery_id,)
                )
                return bool(rows)

            await wait_for(timer_recorded)
    finally:
        await recorder.stop()
        await transport.close()

    # when the trace is read with the CLI's own declarations, whose join timeout is 10 s
    cli_model = FlowModel(create_app(Knobs(join_timeout=10.0)))
    from choreograph.observe.flowdb import flowdb_from_url

    db = flowdb_from_url(db_url)
    await db.open()
    try:
        view = await load_transaction(db, delivery_id, cli_model)
    finally:
        await db.close()

    # then the join timeout is due 300 s after it was set, as the service set it
    assert view is not None
    (timer,) = view["timers"]
    assert timer["name"] == "join:schedule_delivery"
    assert timer["status"] == "set"
    assert 299.0 <= timer["due_at"] - started <= 301.0 + (time.time() - started)
    (expected,) = [x for x in view["expected"] if x["kind"] == "join_timeout"]
    assert expected["due"] == timer["due_at"] and expected["estimated"] is False
    assert expected["status"] == "open"

    # and `choreograph trace` prints that due time, not a guess from its own declarations
    result = await asyncio.to_thread(
        CliRunner().invoke,
        main,
        ["trace", delivery_id, "--db", db_url, "--app", "choreograph.demo:create_app"],
        env={"DRONE_JOIN_TIMEOUT": "10", "COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "was due" not in result.output
    # 300 s after the timer was set, minus the time this test took since (10 s would have ended)
    (left,) = set(re.findall(r"expires in (\d+\.\d)s", result.output))
    assert 300.0 - (time.time() - started) - 1.0 <= float(left) <= 300.0, result.output
    (set_at, due_at) = re.findall(r"set (\S+ \S+)Z, due (\S+ \S+)Z", result.output)[0]
    assert (datetime.fromisoformat(due_at) - datetime.fromisoformat(set_at)).total_seconds() == 300
