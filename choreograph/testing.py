"""Test your own choreographies: run several services together in memory, on a virtual clock.

::

    async with Harness(app) as h:
        await h.publish(DeliveryRequested(...), correlation_id="d1")
        failed = await h.wait_for(DeliveryFailed, correlation_id="d1")   # an Envelope
        await h.advance(30)            # deadlines and delayed retries fire, no waiting
        assert h.published("DeliveryFailed")

Everything is real: the in-memory transport and SQLite-in-memory stores implement the same
contracts as production ones; only time is virtual (it moves when you call :meth:`advance`).

One handler alone, against a state you give, with :meth:`Harness.call`::

    result = await h.call("package", DeliveryRequested(...), state={"package": {...}})
    assert result.emitted == [PackageReady(...)]
    assert result.stored("package", "p1") == {...}

With pytest, the ``harness`` fixture (:mod:`choreograph.pytest_plugin`) starts harnesses and
stops them after the test.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from choreograph.app import App
from choreograph.clock import VirtualClock
from choreograph.context import Context
from choreograph.envelope import Envelope, decode, encode, new_envelope
from choreograph.errors import ConfigurationError, InvalidMessage
from choreograph.events import BUILTIN_EVENTS, Event
from choreograph.middleware import Middleware, Outcome, OutcomeKind
from choreograph.runtime.handling import Handling
from choreograph.runtime.runner import Runtime
from choreograph.runtime.worker import WorkerSettings
from choreograph.service import Service
from choreograph.store import OutboxRow, StoreTx, Timer, store_from_url
from choreograph.transport import DeadLetter, Delivery, Failure, Message
from choreograph.transports.memory import MemoryTransport

#: A service's documents: ``{kind: {key: document}}``.
Documents = dict[str, dict[str, dict[str, Any]]]


class _RecordingTransport(MemoryTransport):
    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock=clock)
        self.record: list[Envelope] = []
        self.changed = asyncio.Event()
        self.publishes = 0
        """Calls of :meth:`publish` so far (poison included): whether anything was published."""

    async def publish(self, messages: Sequence[Message]) -> None:
        await super().publish(messages)
        self.publishes += 1
        for message in messages:
            # poison published on purpose by a test is not recorded: the services dead-letter it
            with contextlib.suppress(InvalidMessage):
                self.record.append(decode(message.body, limit=self.max_message_bytes))
        self.changed.set()


class Harness:
    """Runs ``app`` (or some of its services) in memory with a :class:`VirtualClock`."""

    def __init__(
        self,
        app: App,
        *,
        services: Iterable[str] | None = None,
        middleware: Sequence[Middleware] = (),
        clock: VirtualClock | None = None,
    ) -> None:
        self.clock = clock or VirtualClock()
        self.transport = _RecordingTransport(self.clock)
        self.runtime = Runtime(
            app,
            transport=self.transport,
            store="memory://",
            services=services,
            clock=self.clock,
            middleware=middleware,
            settings=WorkerSettings(concurrency=1, poll_interval=3600, housekeeping_interval=0.25),
        )

    async def __aenter__(self) -> Harness:
        await self.runtime.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.runtime.stop()

    @property
    def events(self) -> list[Envelope]:
        """Every event published so far, in order."""
        return list(self.transport.record)

    def published(self, event_type: type[Event] | str, correlation_id: str = "") -> list[Envelope]:
        name = event_type if isinstance(event_type, str) else event_type.event_type
        return [
            e
            for e in self.transport.record
            if e.type == name and (not correlation_id or e.correlationid == correlation_id)
        ]

    async def publish(self, event: Event, *, correlation_id: str = "") -> Envelope:
        """Publish ``event`` from outside (as a client would), starting or joining a transaction."""
        return await self.runtime.publish(event, source="harness", correlation_id=correlation_id)

    async def wait_for(
        self,
        event_type: type[Event] | str,
        *,
        correlation_id: str = "",
        where: Callable[[Envelope], bool] | None = None,
        timeout: float = 5.0,
    ) -> Envelope:
        """Wait (in real time, up to ``timeout`` s) until a matching event has been published."""

        async def seen() -> Envelope:
            while True:
                for envelope in self.published(event_type, correlation_id):
                    if where is None or where(envelope):
                        return envelope
                self.transport.changed.clear()
                await self.transport.changed.wait()

        try:
            return await asyncio.wait_for(seen(), timeout)
        except TimeoutError:
            name = event_type if isinstance(event_type, str) else event_type.event_type
            got = ", ".join(e.type for e in self.transport.record[-20:]) or "nothing"
            raise AssertionError(
                f"no {name} within {timeout}s (correlation {correlation_id or 'any'}); "
                f"last events: {got}"
            ) from None

    async def settle(self, rounds: int = 200) -> None:
        """Let every service handle everything that is ready now (no virtual time passes)."""
        quiet = 0
        while quiet < 2 and rounds > 0:
            rounds -= 1
            quiet = 0 if self._busy() else quiet + 1
            await asyncio.sleep(0.002)

    def _busy(self) -> bool:
        """A service is handling something, or something is ready or due for one."""
        if any(w.inflight for w in self.runtime.workers.values()):
            return True
        return any(self.transport.busy(name) for name in self.runtime.workers)

    async def advance(self, seconds: float) -> None:
        """Move virtual time forward: due timers, delayed emissions and retries happen.

        Time moves in steps of 0.25 s, the services' housekeeping interval, so whatever a timer
        causes happens at its own virtual time. After a step in which something was published
        or became due, every service settles; a step in which nothing happened costs next to
        nothing, so a long quiet stretch passes quickly.
        """
        await self.settle()
        step = 0.25
        remaining = seconds
        while remaining > 0:
            publishes = self.transport.publishes
            await self.clock.advance(min(step, remaining))
            remaining -= step
            if self.transport.publishes != publishes or self._busy():
                await self.settle()

    async def dead_letters(self, group: str | None = None) -> list[DeadLetter]:
        return await self.transport.dead_letters(group, 100_000)

    async def state(self, service: str, kind: str, key: str) -> dict[str, Any] | None:
        """Read one document of a service's store (for assertions)."""
        async with self.runtime.unit_of_work(service) as uow:
            return await uow.state.get(kind, key)

    async def call(
        self,
        service: str,
        event: Event,
        *,
        state: Mapping[str, Mapping[str, dict[str, Any]]] | None = None,
        correlation_id: str = "call-1",
        attempt: int = 1,
    ) -> Call:
        """Run what ``service`` does with ``event`` (its handler, join part, deadline starts and
        stops), alone, against a store holding exactly ``state`` (``{kind: {key: document}}``).

        The handling is the runtime's own, in one transaction of a fresh in-memory store, on this
        harness' clock and middleware: nothing is published and the running services (if the
        harness is started at all) see nothing. ``attempt`` > 1 handles the event as a
        redelivery, so the retry policy decides as it would on that attempt.
        """
        spec = self.runtime.app.service(service)
        handling = Handling(self.runtime.app, spec, self.clock, self.runtime.hooks)
        if event.event_type not in handling.topics:
            reacts = ", ".join(sorted(handling.topics)) or "nothing"
            raise ConfigurationError(
                f"service {service} does not react to {event.event_type}; it reacts to {reacts}"
            )
        envelope = new_envelope(
            event.event_type,
            event.to_data(),
            source="harness",
            correlation_id=correlation_id,
            dataschema=event.dataschema(),
            extensions=event.envelope_extensions(),
        )
        delivery = Delivery(Message(envelope.id, envelope.type, encode(envelope)), attempt)
        return await self._alone(spec, envelope, state, lambda tx: handling.handle(tx, delivery))

    async def expire(
        self,
        service: str,
        name: str,
        *,
        state: Mapping[str, Mapping[str, dict[str, Any]]] | None = None,
        correlation_id: str = "call-1",
        key: str | None = None,
        attempt: int = 1,
    ) -> Call:
        """Run the expiry of the deadline or join timeout ``name`` of ``service`` alone, as
        :meth:`call` runs a handling: for the transaction ``correlation_id`` (a join keyed by a
        field expires for its ``key``), against a store holding exactly ``state``.

        A join's parts so far are in ``state`` (pass the ``state`` of the calls that brought
        them); with none, the join times out with every part missing.
        """
        spec = self.runtime.app.service(service)
        handling = Handling(self.runtime.app, spec, self.clock, self.runtime.hooks)
        start: type[Event]
        if name in spec.deadlines:
            timer_name, timer_key = f"deadline:{name}", correlation_id
            start = spec.deadlines[name].starts_on
        elif name in spec.joins and spec.joins[name].within is not None:
            join = spec.joins[name]
            timer_name, timer_key = f"join:{name}", key or correlation_id
            start = join.starts_on or join.parts[0]
        else:
            known = [*spec.deadlines, *(j for j, s in spec.joins.items() if s.within)]
            raise ConfigurationError(
                f"service {service} has no deadline or join timeout named {name!r}; "
                f"it has: {', '.join(known) or 'none'}"
            )
        cause = new_envelope(start.event_type, {}, source=service, correlation_id=correlation_id)
        timer = Timer(
            timer_name,
            timer_key,
            self.clock.now(),
            {
                "correlationid": correlation_id,
                "causationid": cause.id,
                "type": cause.type,
                "attempt": attempt,
            },
        )
        return await self._alone(spec, cause, state, lambda tx: handling.fire(tx, timer))

    async def _alone(
        self,
        spec: Service,
        envelope: Envelope,
        state: Mapping[str, Mapping[str, dict[str, Any]]] | None,
        run: Callable[[StoreTx], Awaitable[tuple[Context | None, Outcome]]],
    ) -> Call:
        """``run`` in one transaction of a fresh in-memory store of ``spec`` holding ``state``."""
        store = store_from_url("memory://", spec.name)
        await store.open()
        try:
            async with store.transaction() as tx:
                if spec.tables is not None:
                    from choreograph.orm import create_tables

                    await create_tables(tx, spec.tables)
                for kind, docs in (state or {}).items():
                    for key, doc in docs.items():
                        await tx.put(kind, key, dict(doc))
            async with store.transaction() as raw:
                watched = _WatchedTx(raw)
                ctx, outcome = await run(watched)
                after: Documents = {}
                for kind in sorted(set(state or {}) | watched.kinds):
                    docs = dict(await raw.find(kind, limit=1_000_000))
                    if docs:
                        after[kind] = docs
            timers = await store.list_timers(limit=100_000)
        finally:
            await store.close()
        types = {cls.event_type: cls for cls in (*spec.emits(), *BUILTIN_EVENTS)}
        later = ctx.later if ctx is not None and outcome.kind == "done" else []
        now = self.clock.now()
        return Call(
            outcome=outcome.kind,
            envelope=envelope,
            emitted=[types[e.type].parse_data(e.data) for e in outcome.emitted],
            envelopes=list(outcome.emitted),
            later=[(e, delay) for e, delay in later if delay > 0],
            state=after,
            timers=[PendingTimer(t.name, t.key, t.due_at - now) for t in timers],
            failure=outcome.failure,
            note=outcome.note,
        )


@dataclass(frozen=True, slots=True)
class PendingTimer:
    """A timer a handling left set: ``deadline:NAME`` or ``join:NAME``, for ``key`` (the
    correlation id, or the join's key), due ``due_in`` seconds after the handling."""

    name: str
    key: str
    due_in: float


@dataclass(slots=True)
class Call:
    """What one handling did (see :meth:`Harness.call`)."""

    outcome: OutcomeKind
    """``done``, ``retry``, ``dead_letter``, ``ignored`` (e.g. a join part after the join ended),
    ``late`` (the transaction had ended)."""
    envelope: Envelope
    """The envelope the event was handled in (its id is the causation id of what it emitted)."""
    emitted: list[Event]
    """The events published right after the commit, in order, as typed events; on a give-up,
    the runtime's ``HandlerFailed`` or ``CompensationFailed`` announcement."""
    envelopes: list[Envelope]
    """The same events as envelopes (correlation and causation ids, source)."""
    later: list[tuple[Event, float]]
    """Events emitted with :meth:`Context.emit_later` and a positive delay, with that delay."""
    state: Documents
    """Every document of the kinds given in ``state`` or written by the handling, after it:
    ``{kind: {key: document}}`` (pass it to the next ``call`` to chain handlings)."""
    timers: list[PendingTimer]
    """Deadlines and join timeouts pending after the handling."""
    failure: Failure | None = None
    """For ``retry`` and ``dead_letter``: why (reason, error type, message)."""
    note: str = ""
    """For ``ignored``: why nothing ran."""

    def stored(self, kind: str, key: str) -> dict[str, Any] | None:
        """The document ``(kind, key)`` after the handling, or None."""
        return self.state.get(kind, {}).get(key)


class _WatchedTx(StoreTx):
    """A store transaction that notes which kinds of documents were written through it."""

    def __init__(self, tx: StoreTx) -> None:
        self._tx = tx
        self.kinds: set[str] = set()

    @property
    def connection(self) -> Any:
        return self._tx.connection

    async def get(self, kind: str, key: str) -> dict[str, Any] | None:
        return await self._tx.get(kind, key)

    async def put(self, kind: str, key: str, doc: dict[str, Any]) -> None:
        self.kinds.add(kind)
        await self._tx.put(kind, key, doc)

    async def delete(self, kind: str, key: str) -> bool:
        self.kinds.add(kind)
        return await self._tx.delete(kind, key)

    async def find(
        self,
        kind: str,
        where: dict[str, Any] | None = None,
        limit: int = 100,
        *,
        skip_locked: bool = False,
    ) -> list[tuple[str, dict[str, Any]]]:
        return await self._tx.find(kind, where, limit, skip_locked=skip_locked)

    async def count(self, kind: str, where: dict[str, Any] | None = None) -> int:
        return await self._tx.count(kind, where)

    def savepoint(self) -> AbstractAsyncContextManager[None]:
        return self._tx.savepoint()

    async def seen(self, event_id: str) -> bool:
        return await self._tx.seen(event_id)

    async def remember(self, event_id: str, at: float) -> None:
        await self._tx.remember(event_id, at)

    async def end_transaction(self, correlation_id: str, event_type: str, at: float) -> None:
        await self._tx.end_transaction(correlation_id, event_type, at)

    async def transaction_ended(self, correlation_id: str) -> str | None:
        return await self._tx.transaction_ended(correlation_id)

    async def add_outbox(self, rows: Sequence[OutboxRow], claimed_until: float = 0.0) -> None:
        await self._tx.add_outbox(rows, claimed_until)

    async def forget_outbox(self, ids: Sequence[str]) -> None:
        await self._tx.forget_outbox(ids)

    async def set_timer(self, timer: Timer) -> None:
        await self._tx.set_timer(timer)

    async def cancel_timers(self, key: str, names: Sequence[str] | None = None) -> int:
        return await self._tx.cancel_timers(key, names)

    async def take_due_timers(self, now: float, limit: int) -> list[Timer]:
        return await self._tx.take_due_timers(now, limit)
