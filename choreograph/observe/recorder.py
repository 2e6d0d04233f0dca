"""The flow recorder: a passive observer that writes down every event and what became of it.

Two halves, joined by the bus itself:

* :class:`RecorderMiddleware`, in each service process, buffers one small *report* per handling
  (service, handler, attempt, outcome, retry delay, dead-letter reason, emitted event ids, timings)
  and publishes them in batches as ``choreograph.observed`` messages on the same transport, from a
  background task. Handling never waits for it and never fails because of it: when the bus is
  unreachable reports stay buffered (up to ``max_buffer``, oldest dropped first and counted).
* :class:`Recorder`, in its own process (``choreograph record``), is the consumer group
  ``choreograph-recorder``: it receives every event type of the app plus the reports and writes
  them to a :mod:`~choreograph.observe.flowdb` database. It only listens; it never publishes.

Without the middleware the recorder still sees every event (who published it, what caused it);
the middleware adds who handled it, how, and how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import deque
from datetime import datetime
from typing import Any

import orjson

from choreograph.app import App
from choreograph.context import Context
from choreograph.envelope import Envelope, decode, encode, new_id
from choreograph.errors import InvalidMessage
from choreograph.events import BUILTIN_EVENTS, Event
from choreograph.middleware import Middleware, Next, Outcome, RuntimeView
from choreograph.observe.flowdb import TOUCH, FlowDb, Tx, flowdb_from_url, touch_params
from choreograph.observe.model import is_failure_type, step_kind
from choreograph.transport import Delivery, Failure, Message, Subscription, Transport

log = logging.getLogger("choreograph.recorder")

#: The topic reports travel on. It is a valid event type, so every transport routes it.
REPORTS_TOPIC = "choreograph.observed"
RECORDER_GROUP = "choreograph-recorder"
_STARTED = "recorder.started"
_ENDED = "recorder.ended"


class RecorderMiddleware(Middleware):
    """Reports every handling of this process to the recorder, in batches, off the hot path."""

    def __init__(
        self,
        *,
        flush_interval: float = 0.2,
        batch_size: int = 200,
        max_buffer: int = 50_000,
    ) -> None:
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.max_buffer = max_buffer
        self.dropped = 0
        """Reports dropped because the buffer was full (the bus was unreachable too long)."""
        self._buffer: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._transport: Transport | None = None
        self._app: App | None = None
        self._source = f"recorder-middleware@{socket.gethostname()}:{os.getpid()}"
        self._warned_at = 0.0

    async def start(self, runtime: RuntimeView) -> None:
        self._transport = runtime.transport
        self._app = runtime.app
        self._task = asyncio.create_task(self._flush_loop(), name="choreograph-recorder-reports")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), timeout=5.0)

    async def around_handle(self, ctx: Context, call_next: Next) -> list[Event]:
        ctx.extras[_STARTED] = time.time()
        try:
            return await call_next()
        finally:
            ctx.extras[_ENDED] = time.time()

    def on_outcome(self, ctx: Context, outcome: Outcome) -> None:
        now = time.time()
        failure = outcome.failure
        started = ctx.extras.get(_STARTED, now)
        self._add(
            {
                "id": new_id(),
                "event_id": ctx.event_id,
                "event_type": ctx.envelope.type,
                "correlation_id": ctx.correlation_id,
                "service": ctx.service,
                "handler": ctx.handler,
                "kind": step_kind(self._app, ctx),
                "attempt": ctx.attempt,
                "outcome": outcome.kind,
                "delay": outcome.delay if outcome.kind == "retry" else None,
                "reason": failure.reason if failure else None,
                "error_type": failure.error_type if failure else None,
                "error": failure.error if failure else None,
                "note": outcome.note or None,
                "emitted": [{"id": e.id, "type": e.type} for e in outcome.emitted],
                "started": started,
                "ended": ctx.extras.get(_ENDED, started),
            }
        )

    def on_invalid(self, service: str, body: bytes, failure: Failure) -> None:
        """A message that could not be decoded: reported with whatever ids it has."""
        doc: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            parsed = orjson.loads(body)
            doc = parsed if isinstance(parsed, dict) else {}
        now = time.time()
        event_id = str(doc.get("id") or f"invalid-{uuid.uuid4()}")[:200]
        self._add(
            {
                "id": new_id(),
                "event_id": event_id,
                "event_type": str(doc.get("type") or "?")[:200],
                "correlation_id": str(doc.get("correlationid") or event_id)[:200],
                "service": service,
                "handler": "",
                "kind": "invalid",
                "attempt": 1,
                "outcome": "dead_letter",
                "delay": None,
                "reason": failure.reason,
                "error_type": failure.error_type,
                "error": failure.error,
                "note": None,
                "emitted": [],
                "started": now,
                "ended": now,
            }
        )

    def _add(self, report: dict[str, Any]) -> None:
        if len(self._buffer) >= self.max_buffer:
            self._buffer.popleft()
            self.dropped += 1
        self._buffer.append(report)
        if len(self._buffer) >= self.batch_size:
            self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.flush_interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:
                if time.monotonic() - self._warned_at > 60:
                    self._warned_at = time.monotonic()
                    log.warning("cannot publish flow reports, keeping them buffered: %s", exc)
                await asyncio.sleep(min(5.0, self.flush_interval * 5))

    async def flush(self) -> None:
        """Publish every buffered report now."""
        while self._buffer and self._transport is not None:
            batch = [self._buffer[i] for i in range(min(self.batch_size, len(self._buffer)))]
            messages = _report_messages(batch, self._source, self._transport.max_message_bytes)
            await self._transport.publish(messages)
            for _ in batch:
                self._buffer.popleft()


def _report_messages(reports: list[dict[str, Any]], source: str, limit: int) -> list[Message]:
    """Reports as envelopes, split so that no message passes the transport's size limit."""
    envelope = Envelope(new_id(), REPORTS_TOPIC, source, new_id(), {"reports": reports})
    body = orjson.dumps(envelope.to_dict())
    if len(body) <= limit or len(reports) == 1:
        if len(body) > limit:  # one huge report: keep it, minus its error text
            reports = [{**reports[0], "error": (reports[0].get("error") or "")[:1000]}]
            envelope = envelope.evolve(data={"reports": reports})
        return [Message(envelope.id, REPORTS_TOPIC, encode(envelope, limit=limit))]
    half = len(reports) // 2
    return _report_messages(reports[:half], source, limit) + _report_messages(
        reports[half:], source, limit
    )


# the recorder process ----------------------------------------------------------------------------


class Recorder:
    """Consumes every event of ``app`` and the handling reports, and writes them to ``db``."""

    def __init__(
        self,
        app: App,
        transport: Transport | str,
        db: FlowDb | str | None = None,
        *,
        group: str = RECORDER_GROUP,
        batch_size: int = 500,
        poll_interval: float = 0.5,
        lease: float = 30.0,
    ) -> None:
        from choreograph.transport import transport_from_url

        self.app = app
        self._owns_transport = not isinstance(transport, Transport)
        self.transport = (
            transport if isinstance(transport, Transport) else transport_from_url(transport)
        )
        self.db = db if isinstance(db, FlowDb) else flowdb_from_url(db)
        self.group = group
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.lease = lease
        self.terminal = frozenset(cls.event_type for cls in app.terminal)
        self.recorded = 0
        self.invalid = 0
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()

    def topics(self) -> set[str]:
        types = set(self.app.event_types()) | {cls.event_type for cls in BUILTIN_EVENTS}
        return types | {REPORTS_TOPIC}

    async def start(self) -> None:
        """Declare the recorder's group (from now on the bus keeps everything for it) and start
        consuming in the background."""
        if self._owns_transport:
            await self.transport.connect()
        await self.db.open()
        topics = self.topics()
        await self.transport.declare_group(self.group, topics)
        self._subscription = await self.transport.subscribe(self.group, topics, lease=self.lease)
        self._task = asyncio.create_task(self._loop(), name="choreograph-recorder")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.close()
            self._subscription = None
        await self.db.close()
        if self._owns_transport:
            await self.transport.close()

    async def __aenter__(self) -> Recorder:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def idle(self, timeout: float = 10.0) -> None:
        """Wait until one receive found nothing left to record (for tests and scripts)."""
        self._idle.clear()
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def _loop(self) -> None:
        assert self._subscription is not None
        backoff = 0.1
        while True:
            try:
                batch = await self._subscription.receive(self.batch_size, self.poll_interval)
                if not batch:
                    self._idle.set()
                    continue
                await self.record(batch)
                await self._subscription.ack(batch)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("recorder: cannot record a batch, retrying in %.1fs: %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def record(self, batch: list[Delivery]) -> None:
        """Write one batch of deliveries in one database transaction (idempotently)."""
        now = time.time()
        async with self.db.transaction() as tx:
            for delivery in batch:
                try:
                    envelope = decode(delivery.message.body, limit=1 << 30)
                except InvalidMessage as exc:
                    self.invalid += 1
                    log.warning("recorder: skipping an undecodable message: %s", exc)
                    continue
                if envelope.type == REPORTS_TOPIC:
                    for report in envelope.data.get("reports", []):
                        if isinstance(report, dict):
                            await self._add_report(tx, report)
                else:
                    await self._add_event(tx, envelope, now)
                self.recorded += 1

    async def _add_event(self, tx: Tx, envelope: Envelope, now: float) -> None:
        at = _epoch(envelope.time, now)
        inserted = await tx.execute(
            "INSERT INTO cg_events (id, type, source, correlation_id, causation_id, time, "
            "recorded_at, traceparent, subject, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO NOTHING",
            (
                envelope.id,
                envelope.type,
                envelope.source,
                envelope.correlationid,
                envelope.causationid,
                at,
                now,
                envelope.traceparent,
                envelope.subject,
                orjson.dumps(envelope.data).decode(),
            ),
        )
        if inserted:
            terminal = envelope.type if envelope.type in self.terminal else None
            failures = int(is_failure_type(envelope.type))
            await tx.execute(
                TOUCH,
                touch_params(
                    envelope.correlationid,
                    at,
                    envelope.type,
                    events=1,
                    failures=failures,
                    terminal_type=terminal,
                ),
            )

    async def _add_report(self, tx: Tx, r: dict[str, Any]) -> None:
        try:
            row = (
                str(r["id"]),
                str(r["event_id"]),
                str(r["event_type"]),
                str(r["correlation_id"]),
                str(r["service"]),
                str(r.get("handler") or ""),
                str(r.get("kind") or "handler"),
                int(r.get("attempt") or 1),
                str(r["outcome"]),
                r.get("delay"),
                r.get("reason"),
                r.get("error_type"),
                r.get("error"),
                r.get("note"),
                orjson.dumps(r.get("emitted") or []).decode(),
                float(r["started"]),
                float(r["ended"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            self.invalid += 1
            log.warning("recorder: skipping a malformed report: %s", exc)
            return
        inserted = await tx.execute(
            "INSERT INTO cg_handlings (id, event_id, event_type, correlation_id, service, handler, "
            "kind, attempt, outcome, delay, reason, error_type, error, note, emitted, started, "
            "ended) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO NOTHING",
            row,
        )
        if inserted:
            outcome, kind = row[8], row[6]
            await tx.execute(
                TOUCH,
                touch_params(
                    row[3],
                    row[15],
                    row[2],
                    retries=int(outcome == "retry"),
                    dead_letters=int(outcome == "dead_letter"),
                    compensations=int(kind == "compensation" and outcome == "done"),
                ),
            )


def _epoch(iso: str, default: float) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return default
