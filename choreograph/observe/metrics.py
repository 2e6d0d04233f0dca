"""Prometheus metrics per process: what each service handled, how it went, how long it took,
what is in flight and how far behind each consumer group is.

::

    metrics = MetricsMiddleware(port=9464)          # serves http://127.0.0.1:9464/metrics
    Runtime(app, middleware=[metrics])

or, to mount the endpoint in an existing ASGI app: ``metrics.asgi_app()``. Each middleware has
its own registry unless one is given, so several runtimes in one process never collide. The
endpoint listens on the loopback interface unless ``addr`` says otherwise (``addr="0.0.0.0"``
for a scraper on another host, e.g. in a container).
Needs the ``metrics`` extra: ``pip install 'choreograph[metrics]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from choreograph.context import Context
from choreograph.errors import ConfigurationError
from choreograph.events import Event
from choreograph.middleware import Middleware, Next, Outcome, RuntimeView
from choreograph.observe.model import step_kind
from choreograph.transport import Failure

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric


log = logging.getLogger("choreograph.metrics")
_STARTED = "metrics.started"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def _require() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            f"metrics need prometheus-client: pip install 'choreograph[metrics]' ({exc})"
        ) from None


class MetricsMiddleware(Middleware):
    """Counters, a latency histogram and gauges for every service of the runtime.

    Metrics (labels ``service`` and ``event_type`` unless said otherwise):

    * ``choreograph_handled_total{outcome}`` — settled handlings by outcome (``done``,
      ``duplicate``, ``ignored``, ``late``, ``retry``, ``dead_letter``);
    * ``choreograph_failed_total`` — handlings whose handler failed (retried or dead-lettered);
    * ``choreograph_retried_total``, ``choreograph_dead_lettered_total``;
    * ``choreograph_compensations_total``, ``choreograph_timers_fired_total{kind}``;
    * ``choreograph_emitted_total`` — events published by handlings;
    * ``choreograph_invalid_total{service, reason}`` — undecodable or unroutable messages;
    * ``choreograph_handling_seconds`` — histogram of handler run time;
    * ``choreograph_inflight{service}`` — messages being handled now;
    * ``choreograph_consumer_lag{service}`` — messages waiting for the group, where the
      transport can tell (refreshed every ``lag_interval`` seconds).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        addr: str = "127.0.0.1",
        registry: CollectorRegistry | None = None,
        lag_interval: float = 5.0,
    ) -> None:
        _require()
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        self.port = port
        self.addr = addr
        self.lag_interval = lag_interval
        labels = ("service", "event_type")
        r = self.registry
        self.handled = Counter(
            "choreograph_handled", "Settled handlings by outcome.", (*labels, "outcome"), registry=r
        )
        self.failed = Counter(
            "choreograph_failed", "Handlings whose handler failed.", labels, registry=r
        )
        self.retried = Counter(
            "choreograph_retried", "Handlings scheduled for a retry.", labels, registry=r
        )
        self.dead_lettered = Counter(
            "choreograph_dead_lettered", "Messages dead-lettered.", labels, registry=r
        )
        self.compensations = Counter(
            "choreograph_compensations", "Compensations that ran.", labels, registry=r
        )
        self.timers = Counter(
            "choreograph_timers_fired",
            "Deadlines and join timeouts fired.",
            ("service", "kind"),
            registry=r,
        )
        self.emitted = Counter(
            "choreograph_emitted", "Events published by handlings.", labels, registry=r
        )
        self.invalid = Counter(
            "choreograph_invalid",
            "Messages dead-lettered before decoding.",
            ("service", "reason"),
            registry=r,
        )
        self.latency = Histogram(
            "choreograph_handling_seconds",
            "Handler run time.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._runtime: RuntimeView | None = None
        self._lag: dict[str, int] = {}
        self._lag_task: asyncio.Task[None] | None = None
        self._server: Any = None
        self._thread: Any = None
        self.registry.register(_Gauges(self))

    @property
    def url(self) -> str | None:
        """The scrape URL once serving."""
        if self._server is None:
            return None
        host = "127.0.0.1" if self.addr in ("0.0.0.0", "") else self.addr
        return f"http://{host}:{self._server.server_port}/metrics"

    async def start(self, runtime: RuntimeView) -> None:
        self._runtime = runtime
        if self.port is not None:
            from prometheus_client import start_http_server

            self._server, self._thread = start_http_server(self.port, self.addr, self.registry)
            log.info("metrics on %s", self.url)
        self._lag_task = asyncio.create_task(self._poll_lag(), name="choreograph-metrics-lag")

    async def stop(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
            self._lag_task = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def asgi_app(self) -> Any:
        """An ASGI app serving this registry, to mount at ``/metrics``."""
        from prometheus_client import make_asgi_app

        return make_asgi_app(self.registry)

    def text(self) -> str:
        """The current metrics in the Prometheus text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    # hooks ---------------------------------------------------------------------------------------

    async def around_handle(self, ctx: Context, call_next: Next) -> list[Event]:
        ctx.extras[_STARTED] = time.perf_counter()
        try:
            return await call_next()
        finally:
            elapsed = time.perf_counter() - ctx.extras[_STARTED]
            self.latency.labels(ctx.service, ctx.envelope.type).observe(elapsed)

    def on_outcome(self, ctx: Context, outcome: Outcome) -> None:
        labels = (ctx.service, ctx.envelope.type)
        self.handled.labels(*labels, outcome.kind).inc()
        if outcome.kind in ("retry", "dead_letter") and _STARTED in ctx.extras:
            self.failed.labels(*labels).inc()
        if outcome.kind == "retry":
            self.retried.labels(*labels).inc()
        elif outcome.kind == "dead_letter":
            self.dead_lettered.labels(*labels).inc()
        kind = step_kind(self._runtime.app if self._runtime else None, ctx)
        if kind == "compensation" and outcome.kind == "done":
            self.compensations.labels(*labels).inc()
        elif kind in ("deadline", "join_timeout"):
            self.timers.labels(ctx.service, kind).inc()
        for envelope in outcome.emitted:
            self.emitted.labels(ctx.service, envelope.type).inc()

    def on_invalid(self, service: str, body: bytes, failure: Failure) -> None:
        self.invalid.labels(service, failure.reason).inc()

    # gauges --------------------------------------------------------------------------------------

    async def _poll_lag(self) -> None:
        while True:
            await self.refresh_lag()
            await asyncio.sleep(self.lag_interval)

    async def refresh_lag(self) -> None:
        """Ask the transport how many messages wait for each running service's group."""
        runtime = self._runtime
        if runtime is None:
            return
        for name in list(runtime.workers):
            try:
                lag = await runtime.transport.lag(name)
            except Exception as exc:
                log.debug("lag of %s unavailable: %s", name, exc)
                lag = None
            if lag is None:
                self._lag.pop(name, None)
            else:
                self._lag[name] = lag


class _Gauges:
    """Collected at scrape time: in-flight counts straight from the workers, lag as last polled."""

    def __init__(self, owner: MetricsMiddleware) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        inflight = GaugeMetricFamily(
            "choreograph_inflight", "Messages being handled now.", labels=["service"]
        )
        runtime = self._owner._runtime
        for name, worker in list(runtime.workers.items()) if runtime else []:
            inflight.add_metric([name], worker.inflight)
        yield inflight
        lag = GaugeMetricFamily(
            "choreograph_consumer_lag", "Messages waiting for the group.", labels=["service"]
        )
        for name, value in sorted(self._owner._lag.items()):
            lag.add_metric([name], value)
        yield lag

    def describe(self) -> Iterator[Metric]:
        return iter(())
