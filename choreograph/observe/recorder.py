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
from choreograph.observe.flowdb import COUNT, TOUCH, FlowDb, Tx, flowdb_from_url, touch_params
from choreograph.observe.model import is_failure_type, step_kind
from choreograph.observe.reports import (
    HandlingRow,
    Heartbeat,
    Unrecordable,
    business_keys,
    data_text,
    handling_row,
    heartbeat,
)
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
        heartbeat_interval: float = 5.0,
    ) -> None:
        self.flush_interval = flush_interval
        self.heartbeat_interval = heartbeat_interval
        self.batch_size = batch_size
        self.max_buffer = max_buffer
        self.dropped = 0
        """Reports dropped because the buffer was full (the bus was unreachable too long)."""
        self._buffer: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()  # the flush loop and a stop's last flush, one at a time
        self._task: asyncio.Task[None] | None = None
        self._transport: Transport | None = None
        self._app: App | None = None
        self._runtime: RuntimeView | None = None
        self._started_at = time.time()
        self._beat_at = 0.0
        self._source = f"recorder-middleware@{socket.gethostname()}:{os.getpid()}"
        self._warned_at = 0.0

    async def start(self, runtime: RuntimeView) -> None:
        self._transport = runtime.transport
        self._app = runtime.app
        self._runtime = runtime
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
                "traceback": failure.traceback or None if failure else None,
                "note": outcome.note or None,
                "emitted": [{"id": e.id, "type": e.type} for e in outcome.emitted],
                "started": started,
                "ended": ctx.extras.get(_ENDED, started),
                "timers": [
                    {"action": t.action, "name": t.name, "key": t.key, "due_at": t.due_at}
                    for t in ctx.timers
                ],
                "timer": ctx.extras.get("timer"),
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
            # asyncio.timeout, not wait_for, which can lose stop()'s cancellation on Python 3.11
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:
                if time.monotonic() - self._warned_at > 60:
                    self._warned_at = time.monotonic()
                    log.warning("cannot publish flow reports, keeping them buffered: %s", exc)
                await asyncio.sleep(min(5.0, self.flush_interval * 5))

    async def flush(self) -> None:
        """Publish every buffered report now, and a heartbeat when one is due."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        if self._transport is None:
            return
        if time.monotonic() - self._beat_at >= self.heartbeat_interval:
            await self._transport.publish([self._heartbeat()])
            self._beat_at = time.monotonic()
        while self._buffer:
            batch = [self._buffer[i] for i in range(min(self.batch_size, len(self._buffer)))]
            messages = _report_messages(batch, self._source, self._transport.max_message_bytes)
            await self._transport.publish(messages)
            for _ in batch:
                self._buffer.popleft()

    def _heartbeat(self) -> Message:
        """This replica is alive and runs these services (the console counts replicas)."""
        services = sorted(self._runtime.workers) if self._runtime is not None else []
        beat = {
            "replica": self._source,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "services": services,
            "started": self._started_at,
            "at": time.time(),
        }
        envelope = Envelope(new_id(), REPORTS_TOPIC, self._source, new_id(), {"heartbeat": beat})
        return Message(envelope.id, REPORTS_TOPIC, encode(envelope))


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
    """Consumes every event of ``app`` and the handling reports, and writes them to ``db``.

    Each message is written in its own savepoint: a message the recorder cannot record (not an
    envelope, a report with impossible values) is dead-lettered in the recorder's group with its
    reason, and the rest of the batch is recorded. A bad report inside a batch of reports is
    skipped and kept in ``cg_rejects`` with its reason. With ``retain`` (seconds), transactions
    idle for longer are pruned in the background.
    """

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
        retain: float | None = None,
        prune_interval: float = 60.0,
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
        self.retain = retain
        self.prune_interval = prune_interval
        self.terminal = frozenset(cls.event_type for cls in app.terminal)
        self.recorded = 0
        self.invalid = 0
        self.pruned = 0
        self._subscription: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._stopping = asyncio.Event()

    def topics(self) -> set[str]:
        types = set(self.app.event_types()) | {cls.event_type for cls in BUILTIN_EVENTS}
        return types | {REPORTS_TOPIC}

    async def start(self) -> None:
        """Declare the recorder's group (from now on the bus keeps everything for it) and start
        consuming (and pruning, with ``retain``) in the background."""
        self._stopping.clear()
        if self._owns_transport:
            await self.transport.connect()
        await self.db.open()
        topics = self.topics()
        await self.transport.declare_group(self.group, topics)
        self._subscription = await self.transport.subscribe(self.group, topics, lease=self.lease)
        self._tasks.append(asyncio.create_task(self._loop(), name="choreograph-recorder"))
        if self.retain is not None:
            self._tasks.append(asyncio.create_task(self._prune_loop(), name="recorder-prune"))

    async def stop(self) -> None:
        """Finish the batch in hand and stop. The consuming loop ends by itself after its current
        receive (a cancellation could be swallowed by a broker client blocked in a read); it is
        cancelled only if it does not end in time."""
        self._stopping.set()
        for task in self._tasks:
            if task.get_name() != "choreograph-recorder":
                task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*self._tasks, return_exceptions=True), self.poll_interval + 10.0
            )
        for task in self._tasks:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(task, 5.0)
        self._tasks.clear()
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
        while not self._stopping.is_set():
            try:
                batch = await self._subscription.receive(self.batch_size, self.poll_interval)
                if not batch:
                    self._idle.set()
                    continue
                refused = await self.record(batch)
                for delivery, failure in refused:
                    await self._subscription.dead_letter(delivery, failure)
                done = {id(d) for d, _ in refused}
                await self._subscription.ack([d for d in batch if id(d) not in done])
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is down: nothing acked, retried later
                log.warning("recorder: cannot record a batch, retrying in %.1fs: %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def record(self, batch: list[Delivery]) -> list[tuple[Delivery, Failure]]:
        """Write one batch of deliveries in one database transaction (idempotently). Returns the
        deliveries that cannot be recorded, with why; everything else is written."""
        now = time.time()
        refused: list[tuple[Delivery, Failure]] = []
        async with self.db.transaction() as tx:
            for delivery in batch:
                try:
                    async with tx.savepoint():
                        await self._record_one(tx, delivery, now)
                    self.recorded += 1
                except (InvalidMessage, Unrecordable) as exc:
                    refused.append((delivery, self._refuse(exc, "not recordable")))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if self.db.is_transient(exc):
                        raise  # not this message's fault: retry the batch later
                    refused.append((delivery, self._refuse(exc, "recorder database error")))
        return refused

    def _refuse(self, exc: Exception, reason: str) -> Failure:
        self.invalid += 1
        log.warning("recorder: dead-lettering a message (%s): %s", reason, str(exc)[:300])
        return Failure(reason=reason, error_type=type(exc).__name__, error=str(exc)[:2000])

    async def _record_one(self, tx: Tx, delivery: Delivery, now: float) -> None:
        envelope = decode(delivery.message.body, limit=1 << 30)
        if envelope.type != REPORTS_TOPIC:
            await self._add_event(tx, envelope, now)
            return
        data = envelope.data
        if "heartbeat" in data:
            await self._add_heartbeat(tx, heartbeat(data["heartbeat"]))
        reports = data.get("reports", [])
        for report in reports if isinstance(reports, list) else [reports]:
            try:
                row = handling_row(report)
            except Unrecordable as exc:
                self.invalid += 1
                log.warning("recorder: skipping a malformed report: %s", exc)
                await tx.execute(
                    "INSERT INTO cg_rejects (id, at, reason, detail) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (id) DO NOTHING",
                    (new_id(), now, str(exc)[:1000], data_text(report)[:2000]),
                )
                continue
            await self._add_report(tx, row)

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
                data_text(envelope.data),
            ),
        )
        if not inserted:
            return
        for name, value in business_keys(envelope.data):
            await tx.execute(
                "INSERT INTO cg_keys (value, name, correlation_id) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (value, name, envelope.correlationid),
            )
        await tx.execute(COUNT, ("edge", int(at // 60), envelope.source, envelope.type))
        terminal = envelope.type if envelope.type in self.terminal else None
        outcome = None
        if terminal:
            outcome = "failed" if is_failure_type(terminal) else "completed"
        await tx.execute(
            TOUCH,
            touch_params(
                envelope.correlationid,
                at,
                envelope.type,
                events=1,
                failures=int(is_failure_type(envelope.type)),
                terminal_type=terminal,
                outcome=outcome,
                late=int(terminal is None and await self._is_late(tx, envelope, at)),
            ),
        )

    async def _is_late(self, tx: Tx, envelope: Envelope, at: float) -> bool:
        """An event that reaches a transaction after it ended although its cause came before
        the end (a step that finished too late), rather than a reaction to the end itself."""
        rows = await tx.fetch(
            "SELECT t.ended_at, e.time AS cause_time FROM cg_transactions t "
            "LEFT JOIN cg_events e ON e.id = ? WHERE t.correlation_id = ?",
            (envelope.causationid or "", envelope.correlationid),
        )
        if not rows or rows[0]["ended_at"] is None or at <= rows[0]["ended_at"]:
            return False
        cause = rows[0]["cause_time"]
        return cause is not None and cause < rows[0]["ended_at"]

    async def _add_report(self, tx: Tx, row: HandlingRow) -> None:
        inserted = await tx.execute(
            "INSERT INTO cg_handlings (id, event_id, event_type, correlation_id, service, handler, "
            "kind, attempt, outcome, delay, reason, error_type, error, note, emitted, started, "
            "ended, traceback) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO NOTHING",
            row.columns(),
        )
        if not inserted:
            return
        minute = int(row.ended // 60)
        await tx.execute(COUNT, ("handling", minute, row.service, f"{row.outcome}/{row.kind}"))
        if row.outcome in ("done", "ignored", "dead_letter", "late"):
            await tx.execute(COUNT, ("edge", minute, row.event_type, row.service))
        await self._add_timers(tx, row)
        await tx.execute(
            TOUCH,
            touch_params(
                row.correlation_id,
                row.started,
                row.event_type,
                retries=int(row.outcome == "retry"),
                dead_letters=int(row.outcome == "dead_letter"),
                compensations=int(row.kind == "compensation" and row.outcome == "done"),
                late=int(row.outcome == "late"),
            ),
        )

    async def _add_timers(self, tx: Tx, row: HandlingRow) -> None:
        """The timers this handling fired, cancelled and set, in that order."""
        if row.timer and row.kind in ("deadline", "join_timeout"):
            await tx.execute(
                "UPDATE cg_timers SET status = 'fired', closed_at = ? WHERE service = ? "
                "AND name = ? AND correlation_id = ? AND status = 'set' AND set_at <= ?",
                (row.started, row.service, row.timer, row.correlation_id, row.started),
            )
        for index, note in enumerate(row.timers):
            if note.action == "cancel":
                named = "" if note.name is None else "AND name = ? "
                await tx.execute(
                    "UPDATE cg_timers SET status = 'cancelled', closed_at = ? WHERE service = ? "
                    f"AND key = ? {named}AND status = 'set' AND set_at <= ?",
                    (
                        row.started,
                        row.service,
                        note.key,
                        *(() if note.name is None else (note.name,)),
                        row.started,
                    ),
                )
                continue
            # Setting a timer replaces one of the same name and key (the store does the same).
            await tx.execute(
                "UPDATE cg_timers SET status = 'replaced', closed_at = ? WHERE service = ? "
                "AND name = ? AND key = ? AND status = 'set' AND set_at <= ?",
                (row.started, row.service, note.name, note.key, row.started),
            )
            await tx.execute(
                "INSERT INTO cg_timers (id, service, name, key, correlation_id, event_id, set_at, "
                "due_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'set') "
                "ON CONFLICT (id) DO NOTHING",
                (
                    f"{row.id}/{index}",
                    row.service,
                    note.name or "?",
                    note.key,
                    row.correlation_id,
                    row.event_id,
                    row.started,
                    note.due_at if note.due_at is not None else row.started,
                ),
            )

    async def _add_heartbeat(self, tx: Tx, beat: Heartbeat) -> None:
        for service in beat.services:
            await tx.execute(
                "INSERT INTO cg_heartbeats (replica, service, host, pid, started, last_seen) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (replica, service) DO UPDATE SET "
                "last_seen = CASE WHEN excluded.last_seen > cg_heartbeats.last_seen "
                "THEN excluded.last_seen ELSE cg_heartbeats.last_seen END",
                (beat.replica, service, beat.host, beat.pid, beat.started, beat.at),
            )

    # retention -----------------------------------------------------------------------------------

    async def _prune_loop(self) -> None:
        assert self.retain is not None
        while True:
            try:
                self.pruned += await prune(self.db, time.time() - self.retain)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("recorder: pruning failed, trying again later: %s", exc)
            await asyncio.sleep(self.prune_interval)


async def prune(db: FlowDb, before: float, *, batch: int = 500) -> int:
    """Delete the transactions last seen before ``before`` (epoch seconds), with their events,
    handlings, keys and timers, in small transactions so that the recorder keeps writing
    meanwhile. Returns how many transactions were deleted."""
    deleted = 0
    while True:
        async with db.transaction() as tx:
            rows = await tx.fetch(
                "SELECT correlation_id FROM cg_transactions WHERE last_seen < ? LIMIT ?",
                (before, batch),
            )
            ids = [r["correlation_id"] for r in rows]
            if ids:
                marks = ", ".join("?" for _ in ids)
                for table in ("cg_events", "cg_handlings", "cg_keys", "cg_timers"):
                    await tx.execute(f"DELETE FROM {table} WHERE correlation_id IN ({marks})", ids)
                await tx.execute(
                    f"DELETE FROM cg_transactions WHERE correlation_id IN ({marks})", ids
                )
            else:
                for table, column in (("cg_heartbeats", "last_seen"), ("cg_rejects", "at"),
                                      ("cg_actions", "at")):  # fmt: skip
                    await tx.execute(f"DELETE FROM {table} WHERE {column} < ?", (before,))
                await tx.execute("DELETE FROM cg_rollup WHERE minute < ?", (int(before // 60),))
        deleted += len(ids)
        if len(ids) < batch:
            return deleted
        await asyncio.sleep(0)  # let the recorder's writes in between batches


def _epoch(iso: str, default: float) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return default
