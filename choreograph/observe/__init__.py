"""Layer 6, observe: see the choreography without directing it.

* :class:`TracingMiddleware` and :func:`configure_tracing` — OpenTelemetry spans, one trace per
  business transaction (extra ``otel``).
* :class:`MetricsMiddleware` — Prometheus metrics per process (extra ``metrics``).
* :class:`RecorderMiddleware` and :class:`Recorder` — the passive flow recorder, read back by
  ``choreograph trace``, ``stuck`` and ``stats``.
* :func:`build_graph`/:func:`to_mermaid`/:func:`to_dot`, :func:`lint` and
  :func:`asyncapi_document` — read the declarations only.
* :func:`middleware_from_env` — the middleware a process should run, from environment variables.

Optional dependencies are imported only when a class that needs them is created.
"""

from __future__ import annotations

import os

from choreograph.errors import ConfigurationError
from choreograph.middleware import Middleware
from choreograph.observe.asyncapi import asyncapi_document
from choreograph.observe.flowdb import FlowDb, flowdb_from_url
from choreograph.observe.flows import flow_stats, load_transaction, stuck_transactions
from choreograph.observe.graph import build_graph, to_dot, to_mermaid
from choreograph.observe.lint import Finding, lint
from choreograph.observe.metrics import MetricsMiddleware
from choreograph.observe.model import FlowModel, Step, is_failure_type
from choreograph.observe.recorder import REPORTS_TOPIC, Recorder, RecorderMiddleware
from choreograph.observe.tracing import TracingMiddleware, configure_tracing


def middleware_from_env(environ: dict[str, str] | None = None) -> list[Middleware]:
    """Observe middleware chosen by environment variables, for ``choreograph run``:

    * ``OTEL_TRACES_EXPORTER`` = ``otlp`` | ``console`` (tracing on; standard ``OTEL_*``
      variables configure the exporter and the service name); unset or ``none``: off.
    * ``CHOREOGRAPH_METRICS_PORT`` = a port: Prometheus metrics served there, on 127.0.0.1
      unless ``CHOREOGRAPH_METRICS_ADDR`` names another address (``0.0.0.0``: every interface).
    * ``CHOREOGRAPH_RECORD`` = ``1``: handling reports sent to the flow recorder.
    """
    env = os.environ if environ is None else environ
    found: list[Middleware] = []
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter and exporter != "none":
        found.append(TracingMiddleware(configure_tracing(exporter)))
    port = env.get("CHOREOGRAPH_METRICS_PORT", "").strip()
    if port:
        if not (port.isascii() and port.isdigit() and int(port) <= 65535):
            raise ConfigurationError(
                f"CHOREOGRAPH_METRICS_PORT must be a port number (0: any free one), got {port!r}"
            )
        addr = env.get("CHOREOGRAPH_METRICS_ADDR", "").strip() or "127.0.0.1"
        found.append(MetricsMiddleware(port=int(port), addr=addr))
    if env.get("CHOREOGRAPH_RECORD", "").strip().lower() in ("1", "true", "yes", "on"):
        found.append(RecorderMiddleware())
    return found


__all__ = [
    "REPORTS_TOPIC",
    "Finding",
    "FlowDb",
    "FlowModel",
    "MetricsMiddleware",
    "Recorder",
    "RecorderMiddleware",
    "Step",
    "TracingMiddleware",
    "asyncapi_document",
    "build_graph",
    "configure_tracing",
    "flow_stats",
    "flowdb_from_url",
    "is_failure_type",
    "lint",
    "load_transaction",
    "middleware_from_env",
    "stuck_transactions",
    "to_dot",
    "to_mermaid",
]
