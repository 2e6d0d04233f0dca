"""``--middleware tests.observe._span_file:factory``: tracing whose spans go to a file, one JSON
line per finished span, so a test can read the spans of processes it ran.

The file is named by ``$SPAN_FILE``; each line carries the writing process's pid. A
:class:`SimpleSpanProcessor` writes every span as it ends (nothing is left buffered at exit).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

SPAN_FILE_ENV = "SPAN_FILE"


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def span_line(span: Any) -> dict[str, Any]:
    parent = span.parent
    return {
        "pid": os.getpid(),
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": _hex(span.context.trace_id, 32),
        "span_id": _hex(span.context.span_id, 16),
        "parent_span_id": _hex(parent.span_id, 16) if parent is not None else None,
        "attributes": {
            k: list(v) if isinstance(v, tuple) else v for k, v in (span.attributes or {}).items()
        },
        "links": [
            {
                "trace_id": _hex(link.context.trace_id, 32),
                "span_id": _hex(link.context.span_id, 16),
                "attributes": dict(link.attributes or {}),
            }
            for link in span.links
        ],
    }


def factory() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from choreograph.observe import TracingMiddleware

    path = os.environ[SPAN_FILE_ENV]

    class FileExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            with open(path, "a") as sink:
                for span in spans:
                    sink.write(json.dumps(span_line(span)) + "\n")
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    return TracingMiddleware(tracer_provider=provider)
