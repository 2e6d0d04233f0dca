"""What a service does when one of its timers expires, and how its handlings set and cancel
timers: the context a deadline runs in, its retries and give-up, a timer whose declaration is
gone, and what a terminal event cancels and closes. On the memory bus and a virtual clock."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from sqlalchemy import text

from choreograph import (
    App,
    Context,
    DeadlineExpired,
    Event,
    HandlerFailed,
    JoinTimedOut,
    Parts,
    PermanentFailure,
    RetryPolicy,
    Service,
)
from choreograph.clock import VirtualClock
from choreograph.context import TimerChange
from choreograph.envelope import Envelope, encode
from choreograph.middleware import Middleware, Next, Outcome
from choreograph.orm import TransactionSession
from choreograph.runtime.handling import Handling
from choreograph.store import Timer, store_from_url
from choreograph.testing import Harness
from choreograph.transport import Delivery, Message

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACESTATE = "vendor=handled"


class Started(Event):
    key: str


class Confirmed(Event):
    key: str


class Escalated(Event):
    key: str


class Left(Event):
    key: str


class Right(Event):
    key: str


class Up(Event):
    pass


class Down(Event):
    pass


class Priced(Event):
    sku: str


class Counted(Event):
    sku: str


class Combined(Event):
    key: str


class Done(Event):
    key: str


class Seen(Middleware):
    """Records what observers are told of each handling: its context's timer (in
    ``around_handle``) and, after the commit, its timer changes and its outcome."""

    def __init__(self) -> None:
        self.around: list[tuple[str, Any]] = []
        self.outcomes: list[tuple[str, Outcome, list[TimerChange]]] = []

    async def around_handle(self, ctx: Context, call_next: Next) -> list[Event]:
        self.around.append((ctx.handler, ctx.extras.get("timer")))
        return await call_next()

    def on_outcome(self, ctx: Context, outcome: Outcome) -> None:
        self.outcomes.append((ctx.handler, outcome, list(ctx.timers)))

    def of(self, handler: str) -> list[tuple[Outcome, list[TimerChange]]]:
        return [(outcome, timers) for name, outcome, timers in self.outcomes if name == handler]


def started(key: str, correlation_id: str = "tx") -> Message:
    """A Started event as another service would send it: with trace context."""
    envelope = Envelope(
        id=f"started-{key}-{correlation_id}", type="Started", source="client",
        correlationid=correlation_id, data={"key": key}, traceparent=TRACEPARENT,
        tracestate=TRACESTATE,
    )  # fmt: skip
    return Message(envelope.id, envelope.type, encode(envelope))


# the context a deadline runs in -------------------------------------------------------------------


async def test_a_deadline_runs_in_the_context_of_the_event_that_started_it() -> None:
    # given a deadline started by an event carrying trace context, whose handler notes its
    # context and escalates, both at once and later
    watch = Service("watch")
    seen: list[dict[str, Any]] = []

    @watch.deadline(starts_on=Started, expect=[Confirmed], within=10, emits=[Escalated])
    async def overdue(expired: DeadlineExpired, ctx: Context) -> Escalated:
        seen.append({
            "service": ctx.service, "handler": ctx.handler, "attempt": ctx.attempt,
            "now": ctx.now(), "id": ctx.event_id, "type": ctx.envelope.type,
            "source": ctx.envelope.source, "correlation": ctx.correlation_id,
            "data": ctx.envelope.data, "traceparent": ctx.envelope.traceparent,
            "tracestate": ctx.envelope.tracestate, "key": expired.key,
        })  # fmt: skip
        ctx.emit_later(Escalated(key="again"), 5)
        return Escalated(key=expired.key)

    observer = Seen()
    async with Harness(App("deadlines", [watch]), middleware=[observer]) as h:
        start = h.clock.now()
        await h.transport.publish([started("k")])
        await h.settle()

        # when its time passes
        await h.advance(11)
        escalated = await h.wait_for(Escalated)
        await h.advance(6)
        await h.wait_for(Escalated, where=lambda e: e.data["key"] == "again")

    # then its handler ran once, as the deadline, in the transaction of the starting event, with
    # that event as its cause (no data of its own) and its trace context
    assert seen == [{
        "service": "watch", "handler": "overdue", "attempt": 1, "now": start + 10,
        "id": "started-k-tx", "type": "Started", "source": "watch", "correlation": "tx",
        "data": {}, "traceparent": TRACEPARENT, "tracestate": TRACESTATE, "key": "tx",
    }]  # fmt: skip
    # and what it emitted, at once and later, is caused by the starting event, in its trace
    for envelope in h.published(Escalated):
        assert envelope.correlationid == "tx"
        assert envelope.causationid == "started-k-tx"
        assert envelope.traceparent == TRACEPARENT
        assert envelope.tracestate == TRACESTATE
    assert escalated.data == {"key": "tx"}
    # and middleware saw the handling as the expiry of that timer
    assert ("overdue", "deadline:overdue") in observer.around
    ((outcome, _),) = observer.of("overdue")
    assert outcome.kind == "done"


# retries and giving up ----------------------------------------------------------------------------


def flaky_watch(
    *, fails: int, retry: RetryPolicy | None = None, error: type[Exception] = ConnectionError
) -> tuple[App, list[tuple[int, float]]]:
    """A deadline whose handler fails on its first ``fails`` attempts; the service retries 4
    times, the first at once, then after 2 s and 4 s (no jitter)."""
    watch = Service("watch", retry=RetryPolicy(max_attempts=4, immediate=1, base_delay=2.0,
                                               jitter=0.0))  # fmt: skip
    attempts: list[tuple[int, float]] = []

    @watch.deadline(starts_on=Started, expect=[Confirmed], within=10, emits=[Escalated],
                    retry=retry)  # fmt: skip
    async def overdue(expired: DeadlineExpired, ctx: Context) -> Escalated:
        attempts.append((ctx.attempt, ctx.now()))
        if len(attempts) <= fails:
            raise error(f"attempt {ctx.attempt} failed")
        return Escalated(key=expired.key)

    listener = Service("listener")

    @listener.on(HandlerFailed)
    async def noted(event: HandlerFailed, ctx: Context) -> None:
        await ctx.state.put("failed", event.failed_event_id, event.to_data())

    return App("retries", [watch, listener]), attempts


async def test_a_failing_deadline_is_retried_with_the_services_policy_as_its_next_attempt() -> None:
    # given a deadline failing twice, with no retry policy of its own
    app, attempts = flaky_watch(fails=2)
    observer = Seen()
    async with Harness(app, services=["watch"], middleware=[observer]) as h:
        start = h.clock.now()
        await h.transport.publish([started("k")])

        # when it expires and time goes on
        await h.advance(30)
        await h.wait_for(Escalated)

    # then it ran three times, as attempts 1, 2 and 3: the first retry at once, the second 2 s
    # later (the service's policy)
    assert attempts == [(1, start + 10), (2, start + 10), (3, start + 12)]
    outcomes = [(o.kind, o.delay) for o, _ in observer.of("overdue")]
    assert outcomes == [("retry", 0.0), ("retry", 2.0), ("done", 0.0)]
    (first, timers), *_ = observer.of("overdue")
    assert first.failure is not None
    assert (first.failure.reason, first.failure.error_type) == ("handler error", "ConnectionError")
    assert first.failure.error == "attempt 1 failed"
    # and each retry was set as the same timer, due after its delay
    assert timers == [TimerChange("set", "deadline:overdue", "tx", start + 10)]
    assert len(h.published(Escalated)) == 1


async def test_a_deadline_that_keeps_failing_gives_up_and_announces_itself() -> None:
    # given a deadline that always fails, under its own policy of two attempts (the service
    # would try four)
    app, attempts = flaky_watch(fails=99, retry=RetryPolicy(max_attempts=2, jitter=0.0))
    async with Harness(app) as h:
        start = h.clock.now()
        await h.transport.publish([started("k")])

        # when it expires
        await h.advance(30)
        failed = await h.wait_for(HandlerFailed)
        await h.settle()

        # then it gave up after its own two attempts and announced it, as the deadline failing
        # on the event that started it
        assert attempts == [(1, start + 10), (2, start + 10)]
        assert failed.data["service"] == "watch"
        assert failed.data["handler"] == "overdue"
        assert failed.data["failed_event_type"] == "Started"
        assert failed.data["failed_event_id"] == "started-k-tx"
        assert failed.data["attempts"] == 2
        assert failed.data["error_type"] == "ConnectionError"
        assert failed.data["reason"] == "attempt 2 failed"
        assert failed.correlationid == "tx"
        assert await h.state("listener", "failed", "started-k-tx") is not None
        assert not h.published(Escalated)


async def test_a_deadline_failing_for_good_gives_up_at_once() -> None:
    # given a deadline that fails permanently, under a policy that would retry
    app, attempts = flaky_watch(fails=99, error=PermanentFailure)
    async with Harness(app) as h:
        await h.transport.publish([started("k")])

        # when it expires
        await h.advance(30)
        failed = await h.wait_for(HandlerFailed)

    # then it ran once and was announced as such
    assert [attempt for attempt, _ in attempts] == [1]
    assert failed.data["attempts"] == 1
    assert failed.data["error_type"] == "PermanentFailure"


async def test_a_timers_retry_jitter_comes_from_the_handlings_random_source() -> None:
    # given a handling whose random source is seeded, of a deadline that fails, retried with jitter
    watch = Service("watch", retry=RetryPolicy(max_attempts=5, immediate=0, base_delay=8.0,
                                               jitter=0.5))  # fmt: skip

    @watch.deadline(starts_on=Started, expect=[Confirmed], within=10)
    async def overdue(expired: DeadlineExpired, ctx: Context) -> None:
        raise ConnectionError("unreachable")

    clock = VirtualClock()
    handling = Handling(App("jitter", [watch]), watch, clock, rng=random.Random(7))
    store = store_from_url("memory://", "watch")
    await store.open()
    try:
        # when its timer expires twice
        delays = []
        for attempt in (1, 2):
            timer = Timer("deadline:overdue", "tx", clock.now(),
                          {"correlationid": "tx", "causationid": "s1", "type": "Started",
                           "attempt": attempt})  # fmt: skip
            async with store.transaction() as tx:
                _, outcome = await handling.fire(tx, timer)
            assert outcome.kind == "retry"
            delays.append(outcome.delay)
        pending = await store.list_timers()
    finally:
        await store.close()

    # then both delays are those the seeded source gives, in turn, for attempts 1 and 2
    same = random.Random(7)
    assert delays == [watch.retry.delay(1, same), watch.retry.delay(2, same)]
    assert delays[0] != 8.0
    # and the timer is set again for its next attempt, after that delay
    assert [(t.name, t.key, t.due_at, t.data["attempt"]) for t in pending] == [
        ("deadline:overdue", "tx", clock.now() + delays[1], 3)
    ]


# a timer with no declaration, a join timeout after the join ended ---------------------------------


async def test_a_timer_whose_declaration_is_gone_is_ignored_saying_so() -> None:
    # given a service that no longer declares the deadline or the join whose timers were kept
    watch = Service("watch")

    @watch.on(Started)
    async def start(event: Started, ctx: Context) -> None:
        return None

    handling = Handling(App("gone", [watch]), watch, VirtualClock())
    store = store_from_url("memory://", "watch")
    await store.open()
    try:
        results = []
        for name in ("deadline:overdue", "join:pair"):
            timer = Timer(name, "tx", 0.0, {"correlationid": "tx", "causationid": "s1",
                                            "type": "Started"})  # fmt: skip
            # when each expires
            async with store.transaction() as tx:
                ctx, outcome = await handling.fire(tx, timer)
            results.append((ctx.handler, outcome.kind, outcome.note, outcome.emitted))
    finally:
        await store.close()

    # then nothing runs, and the outcome says why
    assert results == [
        ("overdue", "ignored", "timer deadline:overdue has no declaration any more", []),
        ("pair", "ignored", "timer join:pair has no declaration any more", []),
    ]


def pair_app() -> App:
    merger = Service("merger")

    @merger.join(Left, Right, key="key", within=10, emits=[Combined])
    async def pair(parts: Parts, ctx: Context) -> Combined:
        return Combined(key=parts.key)

    return App("pairs", [merger])


async def test_a_join_timeout_after_the_join_completed_is_ignored_saying_so() -> None:
    # given a join that completed (its timeout was taken just before)
    done = {"status": "done", "parts": {"Left": {"id": "l1", "data": {"key": "k"}}}, "timer": True}
    async with Harness(pair_app()) as h:
        # when its timeout expires
        result = await h.expire("merger", "pair", key="k", state={"_join:pair": {"k": done}})

    # then nothing is published and the join stays as it was
    assert (result.outcome, result.note) == ("ignored", "join pair for k already done")
    assert result.emitted == []
    assert result.stored("_join:pair", "k") == done


# what a timer's handling emits ------------------------------------------------------------------


def strays_app() -> App:
    """A deadline and a join timeout that emit what they do not declare."""
    watch = Service("watch")

    @watch.deadline(starts_on=Started, expect=[Confirmed], within=10, emits=[Escalated])
    async def overdue(expired: DeadlineExpired, ctx: Context) -> Combined:
        return Combined(key=expired.key)

    async def timed_out(event: JoinTimedOut, ctx: Context) -> Combined:
        return Combined(key=event.key)

    @watch.join(Left, Right, key="key", within=10, on_timeout=timed_out, emits=[Escalated])
    async def pair(parts: Parts, ctx: Context) -> None:
        return None

    return App("strays", [watch])


async def test_a_timer_emitting_an_undeclared_event_gives_up_naming_itself() -> None:
    async with Harness(strays_app()) as h:
        # when a deadline and a join timeout emit an event they do not declare
        results = [await h.expire("watch", "overdue"), await h.expire("watch", "pair", key="k")]

    # then each gives up for good, and its announcement names it and what it declares
    for result, name in zip(results, ("overdue", "pair"), strict=True):
        assert result.outcome == "dead_letter"
        (failed,) = result.emitted
        assert isinstance(failed, HandlerFailed)
        assert (failed.handler, failed.error_type) == (name, "PermanentFailure")
        assert failed.reason == (
            f"{name} emitted Combined, which its declaration does not list in emits (Escalated)"
        )


async def test_a_deadline_whose_function_emits_nothing_is_done() -> None:
    watch = Service("watch")

    @watch.deadline(starts_on=Started, expect=[Confirmed], within=10)
    async def overdue(expired: DeadlineExpired, ctx: Context) -> None:
        return None

    async with Harness(App("quiet", [watch])) as h:
        # when a deadline whose function returns nothing expires
        result = await h.expire("watch", "overdue")

    # then its handling is done (it ran), not ignored
    assert (result.outcome, result.note, result.emitted) == ("done", "", [])


async def test_a_deadlines_session_is_kept_for_the_next_handling_once_it_succeeded(
    tmp_path: Path,
) -> None:
    # given a deadline whose function runs a statement through its session, then fails while
    # told to, and a handler noting its session; on a SQLite store
    watch = Service("watch")
    sessions: list[tuple[str, TransactionSession]] = []
    failing: list[bool] = []

    @watch.on(Started)
    async def start(event: Started, ctx: Context) -> None:
        sessions.append(("start", ctx.session))

    @watch.deadline(starts_on=Started, expect=[Confirmed], within=10)
    async def overdue(expired: DeadlineExpired, ctx: Context) -> None:
        sessions.append(("overdue", ctx.session))
        assert await ctx.session.scalar(text("SELECT 1")) == 1
        if failing[-1]:
            raise RuntimeError("not yet")

    handling = Handling(App("sessions", [watch]), watch, VirtualClock())
    store = store_from_url(f"sqlite:///{tmp_path / 'watch.db'}", "watch")
    timer = Timer("deadline:overdue", "tx", 0.0, {"correlationid": "tx", "causationid": "s1",
                                                  "type": "Started"})  # fmt: skip
    await store.open()
    try:
        outcomes = []
        # when the deadline fails, a handling follows, the deadline succeeds, a handling follows
        for fails in (True, False):
            failing.append(fails)
            async with store.transaction() as tx:
                _, fired = await handling.fire(tx, timer)
            async with store.transaction() as tx:
                _, handled = await handling.handle(tx, Delivery(started(f"k{fails}"), 1))
            outcomes += [fired.kind, handled.kind]
    finally:
        await store.close()

    # then the failed deadline's session was discarded (the handling after it got a new one);
    # that handling's session was kept for the deadline, which kept it for the next handling
    assert outcomes == ["retry", "done", "done", "done"]
    assert [name for name, _ in sessions] == ["overdue", "start", "overdue", "start"]
    kept = sessions[1][1]
    assert [session is kept for _, session in sessions] == [False, True, True, True]


async def test_a_join_timing_out_with_no_part_kept_is_recorded_as_expired() -> None:
    async with Harness(pair_app()) as h:
        # when a join's timeout expires and it holds no part (they were never kept)
        result = await h.expire("merger", "pair", key="k")

    # then it times out missing every part, and is kept as expired, its timer spent
    assert result.outcome == "done"
    (timed_out,) = result.emitted
    assert isinstance(timed_out, JoinTimedOut)
    assert (timed_out.present, timed_out.missing) == ([], ["Left", "Right"])
    assert result.stored("_join:pair", "k") == {"status": "expired", "parts": {}, "timer": True}


# timers cancelled ---------------------------------------------------------------------------------


async def test_an_awaited_event_cancels_its_own_deadline_only() -> None:
    # given two deadlines started by one event, each awaiting another event
    watch = Service("watch")
    fired: list[str] = []

    @watch.deadline(starts_on=Started, expect=[Confirmed], within=10)
    async def unconfirmed(expired: DeadlineExpired, ctx: Context) -> None:
        fired.append(expired.name)

    @watch.deadline(starts_on=Started, expect=[Escalated], within=10)
    async def unescalated(expired: DeadlineExpired, ctx: Context) -> None:
        fired.append(expired.name)

    observer = Seen()
    async with Harness(App("two", [watch]), middleware=[observer]) as h:
        start = h.clock.now()
        await h.transport.publish([started("k")])
        await h.settle()

        # when the event one of them awaits arrives
        await h.publish(Confirmed(key="k"), correlation_id="tx")
        await h.settle()
        await h.advance(11)

    # then that deadline alone was cancelled, and said so; the other one fired
    assert fired == ["unescalated"]
    ((_, set_both),) = observer.of("on Started")
    assert set_both == [
        TimerChange("set", "deadline:unconfirmed", "tx", start + 10),
        TimerChange("set", "deadline:unescalated", "tx", start + 10),
    ]
    ((_, cancelled),) = observer.of("on Confirmed")
    assert cancelled == [TimerChange("cancel", "deadline:unconfirmed", "tx")]


def ending_app() -> tuple[App, list[str]]:
    """A service with a deadline and three joins (on a key field, on a field the terminal event
    lacks, on the transaction: in that order, so that the one a terminal event cannot key is
    passed over, not the last looked at), in an app that a Done event ends."""
    merger = Service("merger")
    fired: list[str] = []

    @merger.deadline(starts_on=Left, expect=[Right], within=10)
    async def unmatched(expired: DeadlineExpired, ctx: Context) -> None:
        fired.append(expired.name)

    @merger.join(Left, Right, key="key", within=20, emits=[Combined])
    async def pair(parts: Parts, ctx: Context) -> Combined:
        return Combined(key=parts.key)

    @merger.join(Priced, Counted, key="sku", within=20)
    async def stock(parts: Parts, ctx: Context) -> None:
        fired.append("stock")

    @merger.join(Up, Down, within=20)
    async def both(parts: Parts, ctx: Context) -> None:
        fired.append("both")

    @merger.on(JoinTimedOut)
    async def timed_out(event: JoinTimedOut, ctx: Context) -> None:
        fired.append(f"timeout {event.join}")

    return App("ending", [merger], terminal=[Done]), fired


async def test_a_terminal_event_cancels_the_transactions_timers_and_closes_its_joins() -> None:
    # given a transaction with a deadline, a join on a key field and a join of another
    # transaction with a field the terminal event lacks, all waiting, and a join on the
    # transaction not started yet
    app, fired = ending_app()
    observer = Seen()
    async with Harness(app, middleware=[observer]) as h:
        await h.publish(Left(key="k"), correlation_id="tx")
        await h.publish(Priced(sku="s"), correlation_id="other")
        await h.settle()

        # when the terminal event of the transaction arrives
        await h.publish(Done(key="k"), correlation_id="tx")
        await h.settle()
        store = h.runtime.workers["merger"].store
        pending = [(t.name, t.key) for t in await store.list_timers()]
        await h.advance(30)

        # then the transaction's deadline and its join's timeout are cancelled, and said so
        ((_, ended),) = observer.of("on Done")
        assert ended == [TimerChange("cancel", None, "tx"), TimerChange("cancel", "join:pair", "k")]
        assert pending == [("join:stock", "s")]
        # and its joins are closed, the one not started too; the other transaction's stays open
        assert await h.state("merger", "_join:pair", "k") == {
            "status": "closed", "parts": {"Left": {
                "id": h.published(Left)[0].id, "data": {"key": "k"}, "version": 1,
                "traceparent": None}}, "timer": True,
        }  # fmt: skip
        assert await h.state("merger", "_join:both", "tx") == {
            "status": "closed",
            "parts": {},
            "timer": False,
        }
        stock = await h.state("merger", "_join:stock", "s")
        assert stock is not None
        assert stock["status"] == "expired"

    # and nothing of the ended transaction fired; the other transaction's join timed out
    assert fired == ["timeout stock"]
