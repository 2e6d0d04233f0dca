"""The flow recorder: events, handlings and outcomes of each transaction, and queries on them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import orjson
import pytest

from choreograph import Runtime, transport_from_url
from choreograph.envelope import Envelope, encode
from choreograph.observe.flows import flow_stats, load_transaction, stuck_transactions
from choreograph.observe.model import FlowModel
from choreograph.observe.recorder import REPORTS_TOPIC, Recorder, RecorderMiddleware
from choreograph.transport import Delivery, Message
from tests.observe.conftest import Recorded, place
from tests.observe.shop import build_app
from tests.support.quiet import wait_until_quiet


async def test_completed_transaction_with_a_retry(recorded: Recorded) -> None:
    await place(recorded.runtime, "o-1", sku="flaky")
    await recorded.ended("o-1")
    view = await load_transaction(recorded.recorder.db, "o-1", FlowModel(build_app()))
    assert view is not None
    assert view["status"] == "completed" and view["terminal"] == "OrderShipped"
    types = [e["type"] for e in view["events"]]
    assert types[0] == "OrderPlaced" and types[-1] == "OrderShipped"
    assert sorted(types) == sorted(
        ["OrderPlaced", "StockReserved", "PaymentCharged", "OrderShipped"]
    )
    placed = view["events"][0]
    stock = [(h["attempt"], h["outcome"]) for h in placed["handlings"] if h["service"] == "stock"]
    assert stock == [(1, "retry"), (2, "done")]
    assert view["counts"]["retries"] == 1
    assert view["stuck_at"] == []
    assert all(x["status"] in ("done", "met", "cancelled") for x in view["expected"]), view[
        "expected"
    ]


async def test_failed_compensated_and_stuck(recorded: Recorded) -> None:
    await place(recorded.runtime, "o-bad", sku="declined")
    await place(recorded.runtime, "o-stuck", sku="silent")
    await recorded.ended("o-bad")
    db = recorded.recorder.db
    model = FlowModel(build_app())
    bad = await load_transaction(db, "o-bad", model)
    assert bad is not None and bad["status"] == "failed"
    assert bad["counts"]["compensations"] == 2
    stuck = await stuck_transactions(db, 0.0, model=model)
    assert [r["correlation_id"] for r in stuck] == ["o-stuck"]
    waiting = " ".join(stuck[0]["waiting_for"])
    assert "stock.reserve (silent" in waiting and "shipping.ship (waiting" in waiting
    stats = await flow_stats(db, stuck_after=0.0)
    assert stats["transactions"]["failed"] == 1 and stats["transactions"]["stuck"] == 1
    assert stats["services"]["stock"]["compensations"] == 1


def delivery(envelope: Envelope) -> Delivery:
    return Delivery(Message(envelope.id, envelope.type, encode(envelope)), attempt=1)


async def test_recording_is_idempotent_and_summarised(recorder_db_url: str) -> None:
    app = build_app()
    placed = Envelope(
        "e1", "OrderPlaced", "shop", "tx-1", {"order_id": "1", "sku": "ok", "amount": 1.0}
    )
    shipped = Envelope(
        "e2", "OrderShipped", "shipping", "tx-1", {"order_id": "1"}, causationid="e1"
    )
    report = {
        "id": "r1",
        "event_id": "e1",
        "event_type": "OrderPlaced",
        "correlation_id": "tx-1",
        "service": "stock",
        "handler": "reserve",
        "kind": "handler",
        "attempt": 1,
        "outcome": "retry",
        "delay": 0.5,
        "reason": "handler error",
        "error_type": "RetryLater",
        "error": "busy",
        "note": None,
        "emitted": [],
        "started": time.time(),
        "ended": time.time(),
    }
    reports = Envelope("r", REPORTS_TOPIC, "test", "r", {"reports": [report]})
    recorder = Recorder(app, "memory://", recorder_db_url)
    await recorder.db.open()
    try:
        batch = [delivery(placed), delivery(shipped), delivery(reports)]
        await recorder.record(batch)
        await recorder.record(batch)  # at-least-once: the same messages again

        view = await load_transaction(recorder.db, "tx-1", FlowModel(app))
        assert view is not None
        assert view["status"] == "completed" and view["counts"]["events"] == 2
        assert view["counts"]["retries"] == 1
        assert [h["outcome"] for h in view["events"][0]["handlings"]] == ["retry"]
        assert view["roots"] == ["e1"]
        assert await stuck_transactions(recorder.db, 0.0) == []
    finally:
        await recorder.db.close()


def test_database_urls() -> None:
    from choreograph.errors import ConfigurationError
    from choreograph.observe.flowdb import PostgresFlowDb, SqliteFlowDb, flowdb_from_url

    assert isinstance(flowdb_from_url("sqlite:///flows.db"), SqliteFlowDb)
    pg = flowdb_from_url("postgresql://u:secret@db/x?schema=obs&sslmode=disable")
    assert isinstance(pg, PostgresFlowDb) and pg.schema == "obs"
    for bad in ("mysql://x", "sqlite://host/x.db", "postgresql://db/x?schema=a;drop"):
        with pytest.raises(ConfigurationError):
            flowdb_from_url(bad)


async def test_flushes_at_the_same_time_send_each_report_once() -> None:
    # given a runtime whose recorder middleware holds reports it has not flushed yet, and a
    # group that receives the reports
    transport = transport_from_url("memory://")
    await transport.connect()
    probe = await transport.subscribe("probe", [REPORTS_TOPIC])
    reports = RecorderMiddleware(flush_interval=3600, heartbeat_interval=3600)
    runtime = Runtime(build_app(), transport=transport, store="memory://", middleware=[reports])
    async with runtime:
        for n in range(5):
            await place(runtime, f"o-{n}")
        await wait_until_quiet(runtime, transport)
        buffered = [report["id"] for report in reports._buffer]
        assert buffered

        # when the flush loop and a stop's last flush run at once (the demo's stop did), on a
        # bus whose publish waits, as a broker's network round trip does
        publish = transport.publish

        async def waiting_publish(messages: Sequence[Message]) -> None:
            await asyncio.sleep(0.01)
            await publish(messages)

        transport.publish = waiting_publish  # type: ignore[method-assign]
        await asyncio.gather(reports.flush(), reports.flush(), reports.flush())

        # then every buffered report went out once
        sent: list[str] = []
        while deliveries := await probe.receive(100, 0.1):
            for delivery in deliveries:
                sent += [
                    r["id"] for r in orjson.loads(delivery.message.body)["data"].get("reports", [])
                ]
            await probe.ack(deliveries)
        assert sorted(sent) == sorted(buffered)
    await probe.close()
    await transport.close()
