"""How one service handles one message or one expired timer, inside a store transaction.

decode → route → validate → dedupe (inbox) → late? (ended transactions) → react (handler, join,
deadlines) → emitted events into the outbox → inbox record; failures become a retry or a dead
letter plus a failure event.
Nothing here talks to the transport: the worker settles messages after the commit.
"""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from choreograph.app import App
from choreograph.clock import Clock
from choreograph.context import Context, State, TimerChange, flush_session, release_session
from choreograph.envelope import (
    MAX_EVENT_BYTES,
    Envelope,
    decode,
    new_envelope,
    new_id,
    schema_version,
)
from choreograph.errors import (
    InvalidMessage,
    PermanentFailure,
    RetryLater,
    SchemaViolation,
    TopicMismatch,
    UnknownEventType,
)
from choreograph.events import (
    MAX_ANNOUNCEMENT_DEPTH,
    CompensationFailed,
    DeadlineExpired,
    Event,
    HandlerFailed,
    JoinTimedOut,
)
from choreograph.logs import bounded_traceback
from choreograph.middleware import Outcome
from choreograph.retry import RetryPolicy
from choreograph.runtime import announce
from choreograph.runtime.hooks import Hooks
from choreograph.runtime.outbox import stage
from choreograph.service import DeadlineSpec, HandlerSpec, JoinSpec, Parts, Service
from choreograph.store import DocumentBusy, StoreTx, Timer
from choreograph.transport import Delivery, Failure, Message

log = logging.getLogger("choreograph.handling")

_ANNOUNCEMENTS = (HandlerFailed, CompensationFailed)


@dataclass(slots=True)
class Route:
    """Everything one service does with one event type."""

    cls: type[Event]
    handler: HandlerSpec | None = None
    join: JoinSpec | None = None
    join_starts: list[JoinSpec] = field(default_factory=list)
    deadline_starts: list[DeadlineSpec] = field(default_factory=list)
    deadline_stops: list[DeadlineSpec] = field(default_factory=list)
    terminal: bool = False

    @property
    def allowed(self) -> tuple[type[Event], ...]:
        """What a handling of this type may emit."""
        found: tuple[type[Event], ...] = ()
        if self.handler is not None:
            found += self.handler.emits
        if self.join is not None:
            found += self.join.emits
        return found

    @property
    def after_end(self) -> bool:
        """Whether this event is handled even once its transaction has ended: terminal events,
        compensations, the runtime's failure announcements (an operator must see a compensation
        that failed, which always comes after the end) and handlers declared ``after_end``."""
        if self.terminal or self.cls in _ANNOUNCEMENTS:
            return True
        handler = self.handler
        return handler is not None and (handler.kind == "compensation" or handler.after_end)

    @property
    def name(self) -> str:
        if self.handler is not None:
            return self.handler.name
        if self.join is not None:
            return self.join.name
        return f"on {self.cls.event_type}"


def build_routes(app: App, service: Service) -> dict[str, Route]:
    routes: dict[str, Route] = {}

    def route(cls: type[Event]) -> Route:
        return routes.setdefault(cls.event_type, Route(cls))

    for cls, spec in service.handlers.items():
        route(cls).handler = spec
    for join in service.joins.values():
        for part in join.parts:
            route(part).join = join
        if join.starts_on is not None:
            route(join.starts_on).join_starts.append(join)
    for deadline in service.deadlines.values():
        route(deadline.starts_on).deadline_starts.append(deadline)
        for cls in deadline.expect:
            route(cls).deadline_stops.append(deadline)
    subscribed = app.subscriptions(service)
    for cls in app.terminal:
        if cls in subscribed:  # it learns which transactions ended
            route(cls).terminal = True
    return routes


Handled = tuple[Delivery, Context | None, Outcome]
"""A delivery, the context it was handled in (None when it could not be read) and its outcome."""
# in place of a decoded delivery that waits for what another transaction holds
_HANDED_BACK = Outcome("ignored", note="handed back")
_MOST_READ_AHEAD = 4  # kinds of documents read ahead per event type


@dataclass(slots=True)
class _Batch:
    """What the handlings of one batch share: its transaction, the ids already handled (the
    store's inbox and this batch's) and the transactions known to have ended."""

    tx: StoreTx
    seen: set[str]
    ended: dict[str, str]


class Handling:
    """The handling logic of one service (safe to share by lanes). What it keeps between calls
    is a hint only: which kinds of documents each event type's handling read under its
    correlation id, read ahead for the next batches."""

    def __init__(
        self,
        app: App,
        service: Service,
        clock: Clock,
        hooks: Hooks | None = None,
        *,
        max_event_bytes: int = MAX_EVENT_BYTES,
        rng: random.Random | None = None,
    ) -> None:
        self.app = app
        self.service = service
        self.clock = clock
        self.hooks = hooks or Hooks()
        self.max_event_bytes = max_event_bytes
        self.routes = build_routes(app, service)
        self.topics = frozenset(self.routes)
        self._keeps_timers = service.has_timers()
        # A service that neither receives nor emits a terminal event never records an end:
        # it skips the lookup (a round trip per message on PostgreSQL).
        self._learns_end = any(r.terminal for r in self.routes.values()) or any(
            cls in app.terminal for cls in service.emits()
        )
        self._terminal_types = frozenset(cls.event_type for cls in app.terminal)
        self._rng = rng or random.Random()
        # event type -> kinds of documents its handlings got under their correlation id
        self._reads: dict[str, frozenset[str]] = {}

    # messages ------------------------------------------------------------------------------------

    async def handle(self, tx: StoreTx, delivery: Delivery) -> tuple[Context | None, Outcome]:
        """Handle one delivery inside ``tx`` (the test harness' way). Never raises for a
        handler's failure. Raises :class:`DocumentBusy` when it finds something busy."""
        handled, handed_back = await self.handle_batch(tx, [delivery])
        if handed_back:
            raise DocumentBusy(handed_back[0][1])
        return handled[0][1], handled[0][2]

    async def handle_batch(
        self, tx: StoreTx, deliveries: Sequence[Delivery]
    ) -> tuple[list[Handled], list[tuple[Delivery, tuple[str, str]]]]:
        """Handle ``deliveries`` in order inside ``tx``, with one inbox lookup and one lookup of
        ended transactions for all of them. Never raises for a handler's failure: each handling
        runs in a savepoint of its own, which the stores open only before its first write (a
        handling that writes no state of its own costs no savepoint statement), so a failure
        rolls back that handling alone and the handler runs once.

        Returns the handled deliveries with their outcomes, and those *handed back* with what
        they found busy (a ``locks="raise"`` transaction): handle them again in a transaction
        that takes that first.
        """
        decoded = [self._decode(delivery) for delivery in deliveries]
        ids = [item[0].id for item in decoded if isinstance(item, tuple)]
        seen = await tx.seen_many(ids) if ids else set()
        handed_back: list[tuple[Delivery, tuple[str, str]]] = []
        ended: dict[str, str] = {}
        if self._learns_end:
            # Those that may be late, and those that end their transaction: the store then
            # holds (and knows) their end, and records it with the commit (no statement of its
            # own, no savepoint for it).
            wanted = {
                item[0].correlationid
                for item in decoded
                if isinstance(item, tuple) and (not item[1].after_end or item[1].terminal)
            }
            while wanted:
                try:
                    ended = await tx.ended_transactions(wanted)
                    break
                except DocumentBusy as busy:  # its messages wait; the others go on
                    wanted.discard(busy.lock[1])
                    for index, item in enumerate(decoded):
                        if isinstance(item, tuple) and item[0].correlationid == busy.lock[1]:
                            handed_back.append((deliveries[index], busy.lock))
                            decoded[index] = _HANDED_BACK
        await self._read_ahead(tx, deliveries, decoded, seen, ended, handed_back)
        batch = _Batch(tx, seen, ended)
        handled: list[Handled] = []
        for delivery, item in zip(deliveries, decoded, strict=True):
            if isinstance(item, tuple):
                try:
                    ctx, outcome = await self._handle(batch, delivery, *item)
                except DocumentBusy as busy:
                    handed_back.append((delivery, busy.lock))
                    continue
                handled.append((delivery, ctx, outcome))
            elif item is not _HANDED_BACK:
                handled.append((delivery, None, item))
        return handled, handed_back

    async def _read_ahead(
        self,
        tx: StoreTx,
        deliveries: Sequence[Delivery],
        decoded: list[tuple[Envelope, Route, int] | Outcome],
        seen: set[str],
        ended: dict[str, str],
        handed_back: list[tuple[Delivery, tuple[str, str]]],
    ) -> None:
        """Read, in one go, the documents the batch's handlings will likely get: those of the
        kinds their event type's handlings got under their correlation id before (a join's
        state, a service's record of the transaction). A message whose document another
        transaction holds is handed back, as its ``get`` would have it."""
        if not self._reads:
            return
        wanted: dict[tuple[str, str], list[int]] = {}
        for index, item in enumerate(decoded):
            if not isinstance(item, tuple) or item[0].id in seen:
                continue
            envelope, route = item[0], item[1]
            if self._learns_end and not route.after_end and envelope.correlationid in ended:
                continue  # late: nothing runs
            for kind in self._reads.get(envelope.type, ()):
                wanted.setdefault((kind, envelope.correlationid), []).append(index)
        if not wanted:
            return
        for doc in sorted(await tx.read_ahead(list(wanted))):
            for index in wanted[doc]:
                if decoded[index] is not _HANDED_BACK:
                    handed_back.append((deliveries[index], doc))
                    decoded[index] = _HANDED_BACK

    def _learn_reads(self, ctx: Context) -> None:
        """Remember which kinds this handling got under its correlation id (at most a few)."""
        key = ctx.correlation_id
        kinds = {kind for kind, read in ctx.state._read if read == key}
        known = self._reads.get(ctx.envelope.type, frozenset())
        if kinds and not kinds <= known and len(known) < _MOST_READ_AHEAD:
            self._reads[ctx.envelope.type] = known | frozenset(
                sorted(kinds - known)[: _MOST_READ_AHEAD - len(known)]
            )

    def _decode(self, delivery: Delivery) -> tuple[Envelope, Route, int] | Outcome:
        body = delivery.message.body
        try:
            envelope = decode(body, limit=self.max_event_bytes)
            topic = delivery.message.topic
            if topic and topic != envelope.type:
                raise TopicMismatch(
                    f"an event of type {envelope.type!r} came on topic {topic!r}: events are "
                    "routed by their topic and type alike, so the two must be equal"
                )
            version = schema_version(envelope)
            route = self.routes.get(envelope.type)
            if route is None:
                raise UnknownEventType(
                    f"service {self.service.name} has no handler for {envelope.type!r}"
                )
        except InvalidMessage as exc:
            failure = _failure(exc)
            self.hooks.invalid(self.service.name, body, failure)
            return Outcome("dead_letter", failure=failure)
        return envelope, route, version

    async def _handle(
        self,
        batch: _Batch,
        delivery: Delivery,
        envelope: Envelope,
        route: Route,
        version: int,
    ) -> tuple[Context, Outcome]:
        tx = batch.tx
        ctx = Context(
            self.service.name, envelope, delivery.attempt, State(tx), self.clock, route.name
        )
        try:
            event = route.cls.read(envelope.data, version)
        except Exception as exc:
            # Never retried; announced so the transaction does not wait for this service forever.
            if not isinstance(exc, SchemaViolation):  # e.g. data nested beyond what validates
                exc = SchemaViolation(f"{envelope.type}: cannot validate: {_text(repr(exc), 500)}")
            return ctx, await self._give_up(tx, ctx, route.handler, exc)
        if envelope.id in batch.seen:
            return ctx, Outcome("duplicate")
        ended = None
        if self._learns_end and not route.after_end:
            ended = batch.ended.get(envelope.correlationid)
        notes: list[str] = []
        emitted: list[Envelope] = []
        ready: list[Message] = []
        succeeded = False
        try:
            async with tx.savepoint():
                if ended is None:
                    events = await self.hooks.handle(
                        ctx, lambda: self._react(ctx, route, event, notes)
                    )
                    if ctx.state._session is not None:
                        await flush_session(ctx.state)  # the handler's rows, in its savepoint
                    emitted, ready = await self._emit(tx, ctx, events, route.allowed)
                await tx.remember(envelope.id, self.clock.now())
            succeeded = True
        except Exception as exc:
            return ctx, await self._failed(tx, ctx, route.handler or route.join, exc)
        finally:
            if ctx.state._session is not None:
                await release_session(ctx.state, succeeded=succeeded)
        batch.seen.add(envelope.id)
        if ctx.state._read:
            self._learn_reads(ctx)
        if ended is not None:
            # Late: the transaction ended here first. Starting work now could never be undone
            # (its compensation already ran), so nothing runs; the outcome says so.
            return ctx, Outcome("late", note=f"the transaction already ended with {ended}")
        # what this handling ended is seen by the rest of the batch as the store would show it
        if route.terminal:
            batch.ended.setdefault(envelope.correlationid, envelope.type)
        for out in emitted:
            if out.type in self._terminal_types:
                batch.ended.setdefault(envelope.correlationid, out.type)
        if notes and not emitted:
            return ctx, Outcome("ignored", note="; ".join(notes))
        return ctx, Outcome("done", emitted=emitted, ready=ready)

    async def _react(
        self, ctx: Context, route: Route, event: Event, notes: list[str]
    ) -> list[Event]:
        tx_state = ctx.state
        key = ctx.correlation_id
        now = self.clock.now()
        out: list[Event] = []
        if route.terminal:
            await self._end_transaction(ctx, event)
        for deadline in route.deadline_stops:
            await _cancel_timers(ctx, key, f"deadline:{deadline.name}")
        for deadline in route.deadline_starts:
            await _set_timer(
                ctx, Timer(f"deadline:{deadline.name}", key, now + deadline.within, _cause(ctx))
            )
        for join in route.join_starts:
            doc = await tx_state.get(f"_join:{join.name}", _join_key(join, event, ctx))
            if doc is None:
                await self._start_join_timer(ctx, join, _join_key(join, event, ctx), now)
                await tx_state.put(
                    f"_join:{join.name}", _join_key(join, event, ctx), _new_join(timer=True)
                )
        if route.join is not None:
            out += await self._join_part(ctx, route.join, event, notes)
        if route.handler is not None:
            out += _checked(
                route.handler.name, route.handler.emits, await route.handler.fn(event, ctx)
            )
        return out

    async def _join_part(
        self, ctx: Context, join: JoinSpec, event: Event, notes: list[str]
    ) -> list[Event]:
        key = _join_key(join, event, ctx)
        kind = f"_join:{join.name}"
        doc = await ctx.state.get(kind, key) or _new_join(timer=False)
        part = event.event_type
        if doc["status"] != "open":
            doc.setdefault("late", []).append({"type": part, "id": ctx.event_id})
            await ctx.state.put(kind, key, doc)
            notes.append(f"join {join.name} for {key} already {doc['status']}; late {part}")
            return []
        if part in doc["parts"]:
            notes.append(f"join {join.name} for {key} already has {part}")
            return []
        doc["parts"][part] = {
            "id": ctx.event_id,
            "data": event.to_data(),
            "version": event.event_version,
            "traceparent": ctx.envelope.traceparent,
        }
        if len(doc["parts"]) < len(join.parts):
            if join.within is not None and not doc["timer"]:
                await self._start_join_timer(ctx, join, key, self.clock.now())
                doc["timer"] = True
            await ctx.state.put(kind, key, doc)
            return []
        doc["status"] = "done"
        await ctx.state.put(kind, key, doc)
        await _cancel_timers(ctx, key, f"join:{join.name}")
        by_type = {cls: _kept_part(cls, doc["parts"][cls.event_type]) for cls in join.parts}
        ctx.extras["join_parts"] = [(p["id"], p.get("traceparent")) for p in doc["parts"].values()]
        return _checked(join.name, join.emits, await join.fn(Parts(key, by_type), ctx))

    async def _end_transaction(self, ctx: Context, event: Event) -> None:
        """A terminal event: remember the transaction as ended (later events of it are late),
        drop its timers and close its open joins, so that nothing fires or completes for it."""
        await _tx(ctx.state).end_transaction(ctx.correlation_id, event.event_type, self.clock.now())
        if not self._keeps_timers:
            return
        await _cancel_timers(ctx, ctx.correlation_id, None)
        for join in self.service.joins.values():
            key = ctx.correlation_id if join.key is None else getattr(event, join.key, None)
            if key is None:
                continue
            kind = f"_join:{join.name}"
            doc = await ctx.state.get(kind, str(key)) or _new_join(timer=False)
            if doc["status"] == "open":
                doc["status"] = "closed"
                await ctx.state.put(kind, str(key), doc)
                await _cancel_timers(ctx, str(key), f"join:{join.name}")

    async def _start_join_timer(self, ctx: Context, join: JoinSpec, key: str, now: float) -> None:
        assert join.within is not None
        await _set_timer(ctx, Timer(f"join:{join.name}", key, now + join.within, _cause(ctx)))

    # timers --------------------------------------------------------------------------------------

    async def fire(self, tx: StoreTx, timer: Timer) -> tuple[Context, Outcome]:
        """Run the expiry of one due timer (already removed from the store) inside ``tx``."""
        data = timer.data
        cause = Envelope(
            id=data["causationid"],
            type=data["type"],
            source=self.service.name,
            correlationid=data["correlationid"],
            data={},
            traceparent=data.get("traceparent"),
            tracestate=data.get("tracestate"),
        )
        attempt = int(data.get("attempt", 1))
        kind, _, name = timer.name.partition(":")
        ctx = Context(self.service.name, cause, attempt, State(tx), self.clock, name)
        ctx.extras["timer"] = timer.name
        spec: DeadlineSpec | JoinSpec | None = (
            self.service.deadlines.get(name) if kind == "deadline" else self.service.joins.get(name)
        )
        if spec is None:
            return ctx, Outcome("ignored", note=f"timer {timer.name} has no declaration any more")
        try:
            async with tx.savepoint():
                notes: list[str] = []
                events = await self.hooks.handle(ctx, lambda: self._expire(ctx, spec, timer, notes))
                await flush_session(ctx.state)
                emitted, ready = await self._emit(tx, ctx, events, spec.emits)
        except Exception as exc:
            await release_session(ctx.state)
            ctx.timers.clear()  # rolled back with the savepoint
            policy = spec.retry or self.service.retry
            if not isinstance(exc, PermanentFailure) and not policy.gives_up(attempt):
                delay = policy.delay(attempt, self._rng)
                retry_data = {**data, "attempt": attempt + 1}
                await _set_timer(
                    ctx, Timer(timer.name, timer.key, self.clock.now() + delay, retry_data)
                )
                return ctx, Outcome("retry", delay=delay, failure=_failure(exc))
            return ctx, await self._give_up(tx, ctx, None, exc, spec_name=name)
        await release_session(ctx.state, succeeded=True)
        if notes and not emitted:
            return ctx, Outcome("ignored", note="; ".join(notes))
        return ctx, Outcome("done", emitted=emitted, ready=ready)

    async def _expire(
        self, ctx: Context, spec: DeadlineSpec | JoinSpec, timer: Timer, notes: list[str]
    ) -> list[Event]:
        if isinstance(spec, DeadlineSpec):
            expired = DeadlineExpired(
                service=self.service.name,
                name=spec.name,
                key=timer.key,
                expected=[cls.event_type for cls in spec.expect],
            )
            return _checked(spec.name, spec.emits, await spec.fn(expired, ctx))
        kind = f"_join:{spec.name}"
        doc = await ctx.state.get(kind, timer.key) or _new_join(timer=True)
        if doc["status"] != "open":
            notes.append(f"join {spec.name} for {timer.key} already {doc['status']}")
            return []
        doc["status"] = "expired"
        await ctx.state.put(kind, timer.key, doc)
        present = [cls.event_type for cls in spec.parts if cls.event_type in doc["parts"]]
        timed_out = JoinTimedOut(
            service=self.service.name,
            join=spec.name,
            key=timer.key,
            present=present,
            missing=[cls.event_type for cls in spec.parts if cls.event_type not in present],
            parts={t: doc["parts"][t]["data"] for t in present},
        )
        if spec.on_timeout is None:
            return [timed_out]
        return _checked(spec.name, spec.emits, await spec.on_timeout(timed_out, ctx))

    # shared --------------------------------------------------------------------------------------

    def envelope_for(self, ctx: Context | None, event: Event, correlation_id: str = "") -> Envelope:
        """The envelope of an event emitted by ``ctx`` (or, without one, from outside)."""
        if ctx is not None:
            envelope = Envelope(
                id=new_id(),
                type=event.event_type,
                source=self.service.name,
                correlationid=ctx.correlation_id,
                causationid=ctx.event_id,
                data=event.to_data(),
                traceparent=ctx.envelope.traceparent,
                tracestate=ctx.envelope.tracestate,
                dataschema=event.dataschema(),
                extensions=event.envelope_extensions(),
            )
        else:
            envelope = new_envelope(
                event.event_type,
                event.to_data(),
                source=self.service.name,
                correlation_id=correlation_id,
                dataschema=event.dataschema(),
                extensions=event.envelope_extensions(),
            )
        return self.hooks.stamp(ctx, envelope)

    async def _emit(
        self, tx: StoreTx, ctx: Context, events: list[Event], allowed: tuple[type[Event], ...]
    ) -> tuple[list[Envelope], list[Message]]:
        if not events and not ctx.later:
            return [], []
        if ctx.later:
            _checked(ctx.handler, allowed, [event for event, _ in ctx.later])
        for event in events:
            if isinstance(event, self.app.terminal):
                await self._end_transaction(ctx, event)
        staged = [(self.envelope_for(ctx, e), 0.0) for e in events]
        staged += [(self.envelope_for(ctx, e), delay) for e, delay in ctx.later]
        ready = await self.stage(tx, staged)
        # what this handling emitted at once (delayed events are published by the relay)
        return [envelope for envelope, delay in staged if delay <= 0], ready

    async def stage(
        self, tx: StoreTx, envelopes: Sequence[tuple[Envelope, float]]
    ) -> list[Message]:
        """Stage ``(envelope, delay)`` pairs in ``tx``'s outbox with this service's size limit;
        return the messages to publish right after the commit."""
        return await stage(tx, envelopes, limit=self.max_event_bytes, now=self.clock.now())

    async def _failed(
        self, tx: StoreTx, ctx: Context, spec: HandlerSpec | JoinSpec | None, exc: Exception
    ) -> Outcome:
        ctx.later.clear()
        ctx.timers.clear()  # rolled back with the failed handling
        policy: RetryPolicy = (spec.retry if spec is not None else None) or self.service.retry
        if not isinstance(exc, PermanentFailure | InvalidMessage) and not policy.gives_up(
            ctx.attempt
        ):
            if isinstance(exc, RetryLater) and exc.delay is not None:
                delay = exc.delay
            else:
                delay = policy.delay(ctx.attempt, self._rng)
            return Outcome("retry", delay=delay, failure=_failure(exc))
        return await self._give_up(tx, ctx, spec if isinstance(spec, HandlerSpec) else None, exc)

    async def _give_up(
        self,
        tx: StoreTx,
        ctx: Context,
        spec: HandlerSpec | None,
        exc: Exception,
        *,
        spec_name: str | None = None,
    ) -> Outcome:
        """Dead-letter and announce the failure (bounded; see :mod:`.announce`)."""
        failure = _failure(exc, gave_up=not isinstance(exc, InvalidMessage | PermanentFailure))
        name = spec_name or (spec.name if spec is not None else ctx.handler)
        level = announce.depth(ctx.envelope)
        if level > MAX_ANNOUNCEMENT_DEPTH:
            note = f"not announced: failure announcements are at most {MAX_ANNOUNCEMENT_DEPTH} deep"
            failure = replace(failure, error=f"{failure.error} ({note})")
            return Outcome("dead_letter", failure=failure, note=note)
        compensation = spec is not None and spec.kind == "compensation"
        event_id = announce.announcement_id(self.service.name, name, ctx.event_id)
        problem: Exception | None = None
        for build in announce.forms(
            ctx, name=name, failure=failure, compensation=compensation, level=level
        ):
            try:
                announcement, adjust = build()
                envelope = adjust(self.envelope_for(ctx, announcement).evolve(id=event_id))
                ready = await self.stage(tx, [(envelope, 0.0)])
            except Exception as exc:  # the failed event's content: try a smaller form
                problem = exc
                continue
            return Outcome("dead_letter", failure=failure, emitted=[envelope], ready=ready)
        log.error("%s: the failure of %s could not be announced: %r", self.service.name, name,
                  problem)  # fmt: skip
        note = f"not announced: {type(problem).__name__}: {problem}"[:1000]
        return Outcome("dead_letter", failure=failure, note=note)


def _tx(state: State) -> StoreTx:
    return state._tx


async def _set_timer(ctx: Context, timer: Timer) -> None:
    await _tx(ctx.state).set_timer(timer)
    ctx.timers.append(TimerChange("set", timer.name, timer.key, timer.due_at))


async def _cancel_timers(ctx: Context, key: str, name: str | None) -> None:
    """Cancel one named timer of ``key``, or all of them (``name`` None)."""
    if await _tx(ctx.state).cancel_timers(key, None if name is None else [name]):
        ctx.timers.append(TimerChange("cancel", name, key))


def _cause(ctx: Context) -> dict[str, Any]:
    return {
        "correlationid": ctx.correlation_id,
        "causationid": ctx.event_id,
        "type": ctx.envelope.type,
        "traceparent": ctx.envelope.traceparent,
        "tracestate": ctx.envelope.tracestate,
    }


def _new_join(*, timer: bool) -> dict[str, Any]:
    return {"status": "open", "parts": {}, "timer": timer}


def _kept_part(cls: type[Event], part: dict[str, Any]) -> Event:
    """A join's part as its store keeps it: one kept before an upgrade is read as the version it
    was kept in (1 when the part does not say), through the upcasters."""
    return cls.read(part["data"], part.get("version", 1))


def _join_key(join: JoinSpec, event: Event, ctx: Context) -> str:
    if join.key is None:
        return ctx.correlation_id
    return str(getattr(event, join.key))


def _checked(name: str, allowed: tuple[type[Event], ...], emitted: Any) -> list[Event]:
    if emitted is None:
        return []
    events = [emitted] if isinstance(emitted, Event) else list(emitted)
    for event in events:
        if not isinstance(event, allowed):
            raise PermanentFailure(
                f"{name} emitted {type(event).__name__}, which its declaration does not list in "
                f"emits ({', '.join(c.__name__ for c in allowed) or 'nothing'})"
            )
    return events


def _failure(exc: Exception, *, gave_up: bool = False) -> Failure:
    if isinstance(exc, InvalidMessage):
        reason = exc.reason
    elif isinstance(exc, PermanentFailure):
        reason = "permanent failure"
    elif gave_up:
        reason = "attempts exhausted"
    else:
        reason = "handler error"
    # A message that could not be read has no useful traceback: the reason says it all.
    trace = "" if isinstance(exc, InvalidMessage) else "".join(traceback.format_exception(exc))
    return Failure(
        reason=reason,
        error_type=type(exc).__name__,
        error=_text(str(exc), 2000),
        traceback=bounded_traceback(trace),
    )


def _text(value: str, longest: int) -> str:
    """At most ``longest`` characters of valid UTF-8 without NUL, whatever an exception said
    (dead letters, logs and reports keep it)."""
    text = value[:longest]
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text.replace("\x00", "\\0")
