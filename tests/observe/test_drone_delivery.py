"""The drone delivery, observed: one trace per delivery across every service, the recorder's view
of a completed and a failed-and-compensated delivery, lint and AsyncAPI of the reference app."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from choreograph import App, Runtime, transport_from_url
from choreograph.demo.app import create_app
from choreograph.demo.events import DeliveryRequested
from choreograph.demo.knobs import Knobs
from choreograph.demo.runner import sample_request
from choreograph.observe.asyncapi import asyncapi_document
from choreograph.observe.flows import load_transaction
from choreograph.observe.lint import lint
from choreograph.observe.model import FlowModel
from choreograph.observe.recorder import Recorder, RecorderMiddleware
from choreograph.observe.tracing import TracingMiddleware
from choreograph.transports.memory import MemoryTransport
from tests.observe.conftest import wait_for
from tests.observe.test_asyncapi import validate, validator  # noqa: F401 - the fixture
from tests.support.quiet import wait_until_quiet

KNOBS = Knobs(rejection_rate=0.0, transient_error_rate=0.0, flight_seconds=0.05, join_timeout=30)


def drone_app() -> App:
    return create_app(KNOBS)


async def request(runtime: Runtime, number: int, *, heavy: bool = False) -> str:
    body = sample_request(number, heavy=heavy)
    delivery_id = str(body["delivery_id"])
    async with runtime.unit_of_work("ingestion", correlation_id=delivery_id) as uow:
        uow.emit(DeliveryRequested.model_validate(body))
    return delivery_id


@dataclass
class Observed:
    runtime: Runtime
    recorder: Recorder
    spans: InMemorySpanExporter
    reports: RecorderMiddleware

    async def ended(self, delivery_id: str) -> None:
        async def done() -> bool:
            rows = await self.recorder.db.fetch(
                "SELECT ended_at FROM cg_transactions WHERE correlation_id = ?", (delivery_id,)
            )
            return bool(rows) and rows[0]["ended_at"] is not None

        await wait_for(done)
        # then compensations and trackers react to the terminal event: wait until they are done
        transport = self.recorder.transport
        assert isinstance(transport, MemoryTransport)
        await wait_until_quiet(self.runtime, transport)
        await self.reports.flush()
        await wait_until_quiet(self.runtime, transport, groups=[self.recorder.group])
        await self.recorder.idle()


@pytest.fixture
async def observed(tmp_path: Path) -> AsyncIterator[Observed]:
    transport = transport_from_url("memory://")
    await transport.connect()
    app = drone_app()
    recorder = Recorder(app, transport, f"sqlite:///{tmp_path}/flows.db", poll_interval=0.02)
    await recorder.start()
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    reports = RecorderMiddleware(flush_interval=0.02)
    middleware = [TracingMiddleware(tracer_provider=provider), reports]
    async with Runtime(app, transport=transport, store="memory://", middleware=middleware) as rt:
        yield Observed(rt, recorder, spans, reports)
    await recorder.stop()


async def test_one_delivery_is_one_trace_across_every_service(observed: Observed) -> None:
    delivery_id = await request(observed.runtime, 1)
    await observed.ended(delivery_id)

    spans = [
        s
        for s in observed.spans.get_finished_spans()
        if s.attributes and s.attributes.get("choreograph.correlation_id") == delivery_id
    ]
    assert len({s.context.trace_id for s in spans}) == 1
    services = {s.attributes.get("choreograph.service") for s in spans if s.attributes}
    assert {"ingestion", "package", "drone-scheduler", "delivery", "notification"} <= services
    by_id = {s.context.span_id: s for s in spans}
    (root,) = [s for s in spans if s.parent is None]
    assert root.kind is SpanKind.PRODUCER and root.name == "send DeliveryRequested"
    for span in spans:
        if span is not root:
            assert span.parent is not None and span.parent.span_id in by_id, span.name
    (join,) = [s for s in spans if s.links]
    assert (
        join.attributes is not None
        and join.attributes["choreograph.handler"] == "schedule_delivery"
    )
    linked = {by_id[link.context.span_id].name for link in join.links}
    assert linked == {
        "package process DeliveryRequested",
        "drone-scheduler process DeliveryRequested",
    }


async def test_the_recorder_sees_a_completed_and_a_compensated_delivery(observed: Observed) -> None:
    ok = await request(observed.runtime, 2)
    bad = await request(observed.runtime, 3, heavy=True)
    await observed.ended(ok)
    await observed.ended(bad)
    model = FlowModel(drone_app())

    done = await load_transaction(observed.recorder.db, ok, model)
    assert done is not None and done["status"] == "completed"
    assert {
        "DeliveryRequested",
        "PackageReady",
        "DroneScheduled",
        "DeliveryScheduled",
        "DroneArrived",
        "DeliveryCompleted",
    } <= {e["type"] for e in done["events"]}
    assert done["stuck_at"] == []

    failed = await load_transaction(observed.recorder.db, bad, model)
    assert failed is not None and failed["status"] == "failed"
    assert failed["terminal"] == "DeliveryFailed" and failed["counts"]["compensations"] == 2
    compensations = {
        (h["service"], h["handler"])
        for e in failed["events"]
        for h in e["handlings"]
        if h["kind"] == "compensation"
    }
    assert compensations == {("package", "release_package"), ("drone-scheduler", "release_drone")}


def test_the_reference_app_lints_without_errors() -> None:
    errors = [f for f in lint(drone_app()) if f.severity == "error"]
    assert errors == [], [f.message for f in errors]


def test_the_reference_app_asyncapi_is_valid(validator: Path, tmp_path: Path) -> None:  # noqa: F811
    path = tmp_path / "drone-delivery.json"
    path.write_text(json.dumps(asyncapi_document(drone_app())))
    checked: subprocess.CompletedProcess[str] = validate(validator, path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
