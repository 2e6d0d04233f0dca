"""Tracing: one trace per transaction, each handling under the span that published its cause."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from choreograph import Runtime
from choreograph.observe.tracing import TracingMiddleware, configure_tracing
from tests.observe.conftest import place, wait_for
from tests.observe.shop import build_app


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


def tracing(exporter: InMemorySpanExporter) -> TracingMiddleware:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return TracingMiddleware(tracer_provider=provider)


def by_name(spans: tuple[ReadableSpan, ...], fragment: str) -> list[ReadableSpan]:
    return [s for s in spans if fragment in s.name]


def ended(exporter: InMemorySpanExporter, count: int) -> bool:
    return len(exporter.get_finished_spans()) >= count


async def test_one_trace_with_parents_and_join_links(exporter: InMemorySpanExporter) -> None:
    app = build_app()
    async with Runtime(
        app, transport="memory://", store="memory://", middleware=[tracing(exporter)]
    ) as runtime:
        await place(runtime, "o-1")
        # send + stock + payment + 2 join parts (one runs the join) + OrderShipped x3 (stock,
        # payment and shipping do not consume it: no one) -> wait for the join span
        await wait_for(
            lambda: (
                bool(by_name(exporter.get_finished_spans(), "StockReserved"))
                and bool(by_name(exporter.get_finished_spans(), "PaymentCharged"))
            )
        )
    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1, [s.name for s in spans]

    (send,) = by_name(spans, "send OrderPlaced")
    assert send.kind is SpanKind.PRODUCER and send.parent is None
    for name in ("stock process OrderPlaced", "payment process OrderPlaced"):
        (span,) = by_name(spans, name)
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is not None and span.parent.span_id == send.context.span_id
        assert span.attributes is not None
        assert span.attributes["messaging.destination.name"] == "OrderPlaced"
        assert span.attributes["messaging.consumer.group.name"] == span.name.split()[0]
        assert span.attributes["choreograph.correlation_id"] == "o-1"
        assert span.attributes["messaging.system"] == "memory"
        assert span.attributes["choreograph.outcome"] == "done"
    (reserve,) = by_name(spans, "stock process OrderPlaced")
    (charge,) = by_name(spans, "payment process OrderPlaced")
    (reserved,) = by_name(spans, "shipping process StockReserved")
    (charged,) = by_name(spans, "shipping process PaymentCharged")
    assert reserved.parent is not None and reserved.parent.span_id == reserve.context.span_id
    assert charged.parent is not None and charged.parent.span_id == charge.context.span_id

    join = reserved if reserved.links else charged
    linked = {link.context.span_id for link in join.links}
    assert linked == {reserve.context.span_id, charge.context.span_id}
    assert join.attributes is not None and join.attributes["choreograph.emitted"] == (
        "OrderShipped",
    )


async def test_retry_and_compensation_are_visible(exporter: InMemorySpanExporter) -> None:
    app = build_app()
    async with Runtime(
        app, transport="memory://", store="memory://", middleware=[tracing(exporter)]
    ) as runtime:
        await place(runtime, "o-flaky", sku="flaky")
        await place(runtime, "o-declined", sku="declined")
        await wait_for(lambda: len(by_name(exporter.get_finished_spans(), "OrderFailed")) >= 2)
        await wait_for(
            lambda: len(by_name(exporter.get_finished_spans(), "stock process OrderPlaced")) >= 3
        )
    spans = exporter.get_finished_spans()
    flaky = [
        s
        for s in by_name(spans, "stock process OrderPlaced")
        if s.attributes and s.attributes["choreograph.correlation_id"] == "o-flaky"
    ]
    assert sorted(s.attributes["choreograph.attempt"] for s in flaky if s.attributes) == [1, 2]
    first = next(s for s in flaky if s.attributes and s.attributes["choreograph.attempt"] == 1)
    assert first.attributes is not None and first.attributes["choreograph.outcome"] == "retry"
    assert [e.name for e in first.events] == ["exception", "retry scheduled"]
    assert first.parent is not None and first.parent.span_id == flaky[1].parent.span_id  # type: ignore[union-attr]

    compensations = [
        s
        for s in by_name(spans, "process OrderFailed")
        if s.attributes and s.attributes.get("choreograph.compensation")
    ]
    assert {s.attributes["choreograph.undoes"] for s in compensations if s.attributes} == {
        "reserve",
        "charge",
    }
    declined_trace = {
        s.context.trace_id
        for s in spans
        if s.attributes and s.attributes.get("choreograph.correlation_id") == "o-declined"
    }
    assert len(declined_trace) == 1


def test_configure_tracing_console_and_none() -> None:
    provider = configure_tracing("console", service_name="svc", set_global=False)
    assert provider.resource.attributes["service.name"] == "svc"  # type: ignore[attr-defined]
    configure_tracing("none", set_global=False)
    with pytest.raises(Exception, match="unknown trace exporter"):
        configure_tracing("zipkin", set_global=False)


async def test_an_event_published_without_trace_context_still_makes_one_trace(
    exporter: InMemorySpanExporter,
) -> None:
    from choreograph.envelope import Envelope, encode
    from choreograph.transport import Message
    from tests.observe.shop import OrderPlaced

    app = build_app()
    async with Runtime(
        app, transport="memory://", store="memory://", middleware=[tracing(exporter)]
    ) as runtime:
        # as `choreograph publish` or a producer in another language would: no traceparent
        data = OrderPlaced(order_id="o-raw", sku="ok", amount=1).to_data()
        envelope = Envelope("raw-1", "OrderPlaced", "elsewhere", "o-raw", data)
        await runtime.transport.publish([Message(envelope.id, envelope.type, encode(envelope))])
        await wait_for(
            lambda: (
                bool(by_name(exporter.get_finished_spans(), "process OrderShipped"))
                or len(by_name(exporter.get_finished_spans(), "shipping process")) >= 2
            )
        )
    spans = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1
    roots = by_name(spans, "process OrderPlaced")
    assert len(roots) == 2 and len({s.parent.span_id for s in roots if s.parent}) == 1
