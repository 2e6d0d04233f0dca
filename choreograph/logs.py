"""Logging: which handling a record belongs to, and one JSON object a line for log collectors.

While a message or a timer is handled, the runtime binds its ``service``, ``handler``,
``event_type``, ``event_id``, ``correlation_id`` and ``attempt`` in a context variable
(:func:`handling_fields`). :class:`HandlingFilter` copies them onto every record that passes
through a handler it is attached to, whichever logger made the record: the runtime's, a
driver's, or the user's own handler code. Outside a handling the fields are ``None``.

:func:`configure_logging` (what ``choreograph --log-level/--log-format`` call) installs the filter
with a text or a JSON formatter on the root logger. Applications that configure logging
themselves add ``HandlingFilter()`` to their handlers and use the fields in their format string,
e.g. ``%(correlation_id)s``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson

from choreograph.transport import redact

LogFormat = Literal["text", "json"]
FIELDS = ("service", "handler", "event_type", "event_id", "correlation_id", "attempt")
"""The fields every record carries (``None`` outside a handling)."""

#: Longest traceback kept in a dead letter or a log record (its end, where the error is, is kept).
MAX_TRACEBACK_CHARS = 8000
#: Drivers that log failed connection attempts on their own, before the clean error that the
#: transport raises anyway; they are quieted (CRITICAL only) unless the level asked is DEBUG.
NOISY_DRIVERS = ("aiormq", "aio_pika", "redis", "nats", "asyncpg")

# The bound fields, or a function making them (bound per handling, made only when a record is).
_current: ContextVar[dict[str, Any] | Callable[[], dict[str, Any]] | None] = ContextVar(
    "choreograph_handling", default=None
)
# Attributes every LogRecord has; anything else on a record came from ``extra=`` or a filter.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


@contextlib.contextmanager
def handling_fields(**fields: Any) -> Iterator[None]:
    """Bind the fields of the handling in progress (see :data:`FIELDS`) for the current task."""
    token = _current.set(fields)
    try:
        yield
    finally:
        _current.reset(token)


def bind_handling(fields: Callable[[], dict[str, Any]]) -> Token[Any]:
    """Bind the handling in progress for the current task, by a function that makes its fields
    when a record needs them (the runtime's way: nothing is made for a handling that logs
    nothing). Undo with :func:`unbind_handling`."""
    return _current.set(fields)


def unbind_handling(token: Token[Any]) -> None:
    _current.reset(token)


def _bound() -> dict[str, Any]:
    bound = _current.get()
    if bound is None:
        return {}
    return bound if isinstance(bound, dict) else bound()


def current_fields() -> dict[str, Any]:
    """The fields bound now (empty outside a handling)."""
    return dict(_bound())


def bounded_traceback(text: str, limit: int = MAX_TRACEBACK_CHARS) -> str:
    """``text`` cut to its last ``limit`` characters, marked as cut."""
    if len(text) <= limit:
        return text
    return "…(cut)\n" + text[-limit:]


class HandlingFilter(logging.Filter):
    """Adds the handling fields to each record (never drops one). Fields given explicitly with
    ``extra=`` win over the bound ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _bound()
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, bound.get(name))
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [correlation_id=… event_id=…]``, then the traceback; the
    secrets of any URL in the line are redacted (a driver may log the URL it was given)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        ids = [
            f"{name}={value}"
            for name in ("correlation_id", "event_id")
            if (value := getattr(record, name, None)) is not None and str(value) not in line
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time``, ``level``, ``logger``, ``message``,
    the handling fields that are set, any ``extra=`` values, and ``traceback`` when there is
    one. The secrets of URLs in any text value are redacted."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD and value is not None and not name.startswith("_"):
                doc[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["traceback"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        clean = {k: redact(v) if isinstance(v, str) else v for k, v in doc.items()}
        return orjson.dumps(clean, default=str).decode()


def configure_logging(level: int, fmt: LogFormat = "text", stream: TextIO | None = None) -> None:
    """Log records at ``level`` and above to ``stream`` (stderr), in ``fmt``, each with the
    handling fields; replaces the root logger's handlers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(HandlingFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in NOISY_DRIVERS:
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else logging.CRITICAL)
