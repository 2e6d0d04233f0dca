"""OpenTelemetry tracing: one business transaction is one trace, across every service and hop.

Each handling is a CONSUMER span whose parent is the span that published the event it handles
(read from the envelope's W3C ``traceparent``/``tracestate``); events it emits carry its own
context, so the next service's span hangs under it. A join's span *links* every part it waited
for. Retries, dead letters, ignored, late and duplicate deliveries, compensations, deadlines and
join timeouts are span events and attributes. Events published from outside a handler get a PRODUCER
span, a child of whatever span is current (e.g. the HTTP request's)::

    from choreograph.observe import TracingMiddleware, configure_tracing

    configure_tracing(exporter="otlp", endpoint="http://localhost:4318", service_name="delivery")
    Runtime(app, middleware=[TracingMiddleware()])

Needs the ``otel`` extra: ``pip install 'choreograph[otel]'``.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from choreograph.context import Context
from choreograph.envelope import Envelope
from choreograph.errors import ConfigurationError
from choreograph.events import Event
from choreograph.middleware import Middleware, Next, Outcome, RuntimeView
from choreograph.observe.model import compensation_of, is_failure_type, timer_kind

if TYPE_CHECKING:
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Span, TracerProvider

    from choreograph.app import App

_SPAN = "otel.span"
_HANDLED_AT = "otel.handled_ns"
_INSTRUMENTATION = "choreograph"
_SYSTEMS = {"amqp": "rabbitmq"}


def require_otel() -> None:
    """Raise a :class:`ConfigurationError` naming the extra when OpenTelemetry is missing."""
    try:
        import opentelemetry.sdk.trace
        import opentelemetry.trace  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            f"tracing needs OpenTelemetry: pip install 'choreograph[otel]' ({exc})"
        ) from None


class TracingMiddleware(Middleware):
    """Spans for every handling, with trace context carried in the envelopes.

    ``tracer_provider`` defaults to the global one (set it with :func:`configure_tracing`);
    ``propagator`` to the global text-map propagator (W3C trace context unless ``OTEL_PROPAGATORS``
    says otherwise). The middleware only observes: it never changes what a handler does.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        require_otel()
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from choreograph import __version__

        self._tracer = trace.get_tracer(_INSTRUMENTATION, __version__, tracer_provider)
        self._propagator = propagator
        self._w3c = TraceContextTextMapPropagator()
        self._system = "choreograph"
        self._app: App | None = None

    async def start(self, runtime: RuntimeView) -> None:
        self._app = runtime.app
        scheme = getattr(runtime.transport, "scheme", "choreograph")
        self._system = _SYSTEMS.get(scheme, scheme)

    # hooks ---------------------------------------------------------------------------------------

    async def around_handle(self, ctx: Context, call_next: Next) -> list[Event]:
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        span = self._span(ctx)
        try:
            with trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                return await call_next()
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
            raise
        finally:
            ctx.extras[_HANDLED_AT] = time.time_ns()
            self._link_join_parts(ctx, span)

    def stamp(self, ctx: Context | None, envelope: Envelope) -> Envelope:
        if ctx is None:
            return self._stamp_outside(envelope)
        from opentelemetry import trace

        carrier: dict[str, str] = {}
        self._inject(carrier, trace.set_span_in_context(self._span(ctx)))
        return _with_carrier(envelope, carrier)

    def on_outcome(self, ctx: Context, outcome: Outcome) -> None:
        from opentelemetry.trace import Status, StatusCode

        span: Span = ctx.extras.pop(_SPAN, None) or self._span(ctx, keep=False)
        span.set_attribute("choreograph.outcome", outcome.kind)
        if outcome.emitted:
            types = [e.type for e in outcome.emitted]
            span.set_attribute("choreograph.emitted", types)
            failures = [t for t in types if is_failure_type(t)]
            if failures:
                span.add_event("failure announced", {"choreograph.event_types": failures})
        if outcome.kind == "retry" and outcome.failure is not None:
            span.add_event(
                "retry scheduled",
                {
                    "choreograph.retry.delay_s": outcome.delay,
                    "choreograph.attempt": ctx.attempt,
                    "error.type": outcome.failure.error_type,
                    "exception.message": outcome.failure.error,
                },
            )
            span.set_status(Status(StatusCode.ERROR, outcome.failure.error[:500]))
        elif outcome.kind == "dead_letter" and outcome.failure is not None:
            span.add_event(
                "dead-lettered",
                {
                    "choreograph.reason": outcome.failure.reason,
                    "choreograph.attempt": ctx.attempt,
                    "error.type": outcome.failure.error_type,
                    "exception.message": outcome.failure.error,
                },
            )
            span.set_attribute("error.type", outcome.failure.error_type)
            span.set_status(Status(StatusCode.ERROR, outcome.failure.reason))
        elif outcome.kind in ("ignored", "duplicate", "late"):
            span.add_event(outcome.kind, {"choreograph.note": outcome.note} if outcome.note else {})
        end = ctx.extras.pop(_HANDLED_AT, None)
        span.end(end_time=end if isinstance(end, int) else None)

    # helpers -------------------------------------------------------------------------------------

    def _span(self, ctx: Context, *, keep: bool = True) -> Span:
        """The span of ``ctx``'s handling, started on first use."""
        found: Span | None = ctx.extras.get(_SPAN)
        if found is not None:
            return found
        from opentelemetry.trace import SpanKind

        envelope = ctx.envelope
        timer = timer_kind(self._app, ctx)
        attributes: dict[str, Any] = {
            "messaging.system": self._system,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": envelope.type,
            "messaging.message.id": envelope.id,
            "messaging.message.conversation_id": envelope.correlationid,
            "messaging.consumer.group.name": ctx.service,
            "choreograph.service": ctx.service,
            "choreograph.handler": ctx.handler,
            "choreograph.correlation_id": envelope.correlationid,
            "choreograph.attempt": ctx.attempt,
        }
        if envelope.causationid:
            attributes["choreograph.causation_id"] = envelope.causationid
        undoes = compensation_of(self._app, ctx)
        if undoes:
            attributes["choreograph.compensation"] = True
            attributes["choreograph.undoes"] = undoes
        if timer is not None:
            name = f"{ctx.service} {timer.replace('_', ' ')} {ctx.handler}"
            attributes["choreograph.timer"] = timer
            kind = SpanKind.INTERNAL
        else:
            name = f"{ctx.service} process {envelope.type}"
            kind = SpanKind.CONSUMER
        span = self._tracer.start_span(
            name, context=self._extract(envelope), kind=kind, attributes=attributes
        )
        if timer == "deadline":
            span.add_event("deadline expired", {"choreograph.deadline": ctx.handler})
        elif timer == "join_timeout":
            span.add_event("join timed out", {"choreograph.join": ctx.handler})
        if undoes:
            span.add_event("compensating", {"choreograph.undoes": undoes})
        if keep:
            ctx.extras[_SPAN] = span
        return span

    def _stamp_outside(self, envelope: Envelope) -> Envelope:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        parent = self._extract(envelope) if envelope.traceparent else None
        span = self._tracer.start_span(
            f"send {envelope.type}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": self._system,
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": envelope.type,
                "messaging.message.id": envelope.id,
                "messaging.message.conversation_id": envelope.correlationid,
                "choreograph.correlation_id": envelope.correlationid,
                "choreograph.service": envelope.source,
            },
        )
        carrier: dict[str, str] = {}
        self._inject(carrier, trace.set_span_in_context(span))
        span.end()
        return _with_carrier(envelope, carrier)

    def _link_join_parts(self, ctx: Context, span: Span) -> None:
        from opentelemetry import trace

        parts = ctx.extras.get("join_parts") or []
        for event_id, traceparent in parts:
            if not traceparent:
                continue
            remote = trace.get_current_span(self._w3c.extract({"traceparent": traceparent}))
            context = remote.get_span_context()
            if context.is_valid:
                span.add_link(
                    context,
                    {"messaging.message.id": str(event_id), "choreograph.link": "join part"},
                )
        if parts:
            span.set_attribute("choreograph.join.parts", [str(p[0]) for p in parts])

    def _extract(self, envelope: Envelope) -> OtelContext | None:
        if not envelope.traceparent:
            return _synthetic_parent(envelope)
        carrier = {"traceparent": envelope.traceparent}
        if envelope.tracestate:
            carrier["tracestate"] = envelope.tracestate
        if self._propagator is not None:
            return self._propagator.extract(carrier)
        from opentelemetry import propagate

        return propagate.extract(carrier)

    def _inject(self, carrier: dict[str, str], context: OtelContext) -> None:
        if self._propagator is not None:
            self._propagator.inject(carrier, context)
            return
        from opentelemetry import propagate

        propagate.inject(carrier, context)


def _synthetic_parent(envelope: Envelope) -> OtelContext:
    """A remote parent for an event published without trace context (``choreograph publish``,
    a producer in another language): its trace id derives from the correlation id and its span
    id from the event id, so every service handling it, and everything after, shares one trace."""
    import hashlib

    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    trace_id = int(hashlib.sha256(envelope.correlationid.encode()).hexdigest()[:32], 16) or 1
    span_id = int(hashlib.sha256(envelope.id.encode()).hexdigest()[:16], 16) or 1
    parent = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(1))
    return trace.set_span_in_context(NonRecordingSpan(parent))


def _with_carrier(envelope: Envelope, carrier: dict[str, str]) -> Envelope:
    if "traceparent" not in carrier:
        return envelope
    return envelope.evolve(traceparent=carrier["traceparent"], tracestate=carrier.get("tracestate"))


# configuration -----------------------------------------------------------------------------------


def configure_tracing(
    exporter: str | None = None,
    *,
    endpoint: str | None = None,
    service_name: str | None = None,
    set_global: bool = True,
) -> TracerProvider:
    """Create (and by default install globally) a tracer provider exporting spans.

    ``exporter`` is ``otlp`` (OTLP over HTTP), ``console`` or ``none``; it defaults to
    ``OTEL_TRACES_EXPORTER``, then ``otlp``. ``endpoint`` is the collector's base URL
    (``http://host:4318``) or its full traces URL; it defaults to the standard
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``/``OTEL_EXPORTER_OTLP_ENDPOINT``. ``service_name``
    defaults to ``OTEL_SERVICE_NAME``, then ``choreograph``; ``OTEL_RESOURCE_ATTRIBUTES`` is
    honoured.
    """
    require_otel()
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    choice = (exporter or os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").strip().lower()
    if choice not in ("otlp", "console", "none"):
        raise ConfigurationError(f"unknown trace exporter {choice!r}; use otlp, console or none")
    name = service_name or os.environ.get("OTEL_SERVICE_NAME") or "choreograph"
    provider = SdkTracerProvider(resource=Resource.create({"service.name": name}))
    span_exporter: SpanExporter | None = None
    if choice == "console":
        span_exporter = ConsoleSpanExporter()
    elif choice == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ConfigurationError(
                f"the otlp exporter needs: pip install 'choreograph[otel]' ({exc})"
            ) from None
        span_exporter = OTLPSpanExporter(endpoint=_traces_url(endpoint) if endpoint else None)
    if span_exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def _traces_url(endpoint: str) -> str:
    """``http://host:4318`` → ``http://host:4318/v1/traces``; a full URL is kept as it is."""
    from urllib.parse import urlsplit

    if urlsplit(endpoint).path.strip("/"):
        return endpoint
    return endpoint.rstrip("/") + "/v1/traces"
