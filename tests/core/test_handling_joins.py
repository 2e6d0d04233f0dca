"""What a join keeps of each part, how it completes, what it does with a part arriving after it
ended, and how it reads a part kept before its type was upgraded. On the memory bus and a
virtual clock; single handlings through ``Harness.call``."""

from __future__ import annotations

from typing import Any

from choreograph import (
    App,
    Context,
    Event,
    HandlerFailed,
    Parts,
    PermanentFailure,
    Service,
    upcaster,
)
from choreograph.context import TimerChange
from choreograph.envelope import Envelope, encode
from choreograph.middleware import Middleware, Outcome
from choreograph.testing import Harness, PendingTimer
from choreograph.transport import Message


class Left(Event):
    key: str
    value: int


class Right(Event):
    key: str
    value: int


class Combined(Event):
    key: str
    total: int


class Stray(Event):
    pass


class Weighed(Event, version=2):
    key: str
    grams: int


@upcaster(Weighed, from_version=1)
def _kilograms_to_grams(data: dict[str, Any]) -> dict[str, Any]:
    return {"key": data["key"], "grams": data["kg"] * 1000}


class Labelled(Event):
    key: str


class Packed(Event):
    key: str
    grams: int


def merger_app(*, within: float | None = 10.0, fails: bool = False, strays: bool = False) -> App:
    merger = Service("merger")

    @merger.join(Left, Right, key="key", within=within, emits=[Combined])
    async def pair(parts: Parts, ctx: Context) -> Combined | Stray:
        if fails:
            raise PermanentFailure("cannot combine")
        if strays:
            return Stray()
        return Combined(key=parts.key, total=parts[Left].value + parts[Right].value)

    @merger.join(Weighed, Labelled, key="key", emits=[Packed])
    async def pack(parts: Parts, ctx: Context) -> Packed:
        return Packed(key=parts.key, grams=parts[Weighed].grams)

    return App("merging", [merger])


def kept(envelope: Envelope, *, version: int = 1) -> dict[str, Any]:
    """A part as the join keeps it."""
    return {"id": envelope.id, "data": envelope.data, "version": version,
            "traceparent": envelope.traceparent}  # fmt: skip


# parts --------------------------------------------------------------------------------------------


async def test_a_joins_first_part_is_kept_whole_and_starts_its_timeout() -> None:
    async with Harness(merger_app()) as h:
        # when the first part of a join with a timeout arrives
        result = await h.call("merger", Left(key="k", value=1), correlation_id="tx")

    # then it is kept with its id, data, version and trace context, and the timeout runs
    assert result.outcome == "done"
    assert result.stored("_join:pair", "k") == {
        "status": "open", "parts": {"Left": kept(result.envelope)}, "timer": True,
    }  # fmt: skip
    assert result.timers == [PendingTimer("join:pair", "k", 10.0)]


async def test_a_join_without_a_timeout_keeps_its_parts_and_sets_no_timer() -> None:
    async with Harness(merger_app(within=None)) as h:
        # when the first part of a join without a timeout arrives
        result = await h.call("merger", Right(key="k", value=2))

    # then it is kept, and no timer runs
    assert result.stored("_join:pair", "k") == {
        "status": "open", "parts": {"Right": kept(result.envelope)}, "timer": False,
    }  # fmt: skip
    assert result.timers == []


async def test_a_part_the_join_already_has_is_ignored_saying_so() -> None:
    async with Harness(merger_app()) as h:
        # given a join holding its Left part
        first = await h.call("merger", Left(key="k", value=1))

        # when another Left part arrives for the same key
        again = await h.call("merger", Left(key="k", value=100), state=first.state)

    # then it is ignored, and the join holds the first one
    assert (again.outcome, again.note) == ("ignored", "join pair for k already has Left")
    assert again.stored("_join:pair", "k") == first.stored("_join:pair", "k")


async def test_a_part_after_the_join_completed_is_recorded_as_late() -> None:
    async with Harness(merger_app()) as h:
        # given a completed join
        first = await h.call("merger", Left(key="k", value=1))
        second = await h.call("merger", Right(key="k", value=2), state=first.state)
        done = second.stored("_join:pair", "k")
        assert done == {
            "status": "done",
            "parts": {"Left": kept(first.envelope), "Right": kept(second.envelope)},
            "timer": True,
        }

        # when a part arrives once more, twice
        late = await h.call("merger", Right(key="k", value=3), state=second.state)
        later = await h.call("merger", Left(key="k", value=4), state=late.state)

    # then each is ignored, saying why, and recorded as late with its id
    assert (late.outcome, late.note) == ("ignored", "join pair for k already done; late Right")
    assert (later.outcome, later.note) == ("ignored", "join pair for k already done; late Left")
    assert later.stored("_join:pair", "k") == {
        **done, "late": [{"type": "Right", "id": late.envelope.id},
                         {"type": "Left", "id": later.envelope.id}],
    }  # fmt: skip
    assert later.emitted == []


class Joined(Middleware):
    """Records, after each commit, what the handling said of its join's parts and timers."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any, list[TimerChange]]] = []

    def on_outcome(self, ctx: Context, outcome: Outcome) -> None:
        self.seen.append((outcome.kind, ctx.extras.get("join_parts"), list(ctx.timers)))


def part(event: Event, event_id: str, traceparent: str) -> Message:
    """A part as another service sends it: with its trace context."""
    envelope = Envelope(id=event_id, type=event.event_type, source="elsewhere",
                        correlationid="tx", data=event.to_data(),
                        traceparent=traceparent)  # fmt: skip
    return Message(envelope.id, envelope.type, encode(envelope))


async def test_a_completed_join_links_its_parts_traces_and_cancels_its_timeout() -> None:
    left_trace = "00-11111111111111111111111111111111-1111111111111111-01"
    right_trace = "00-22222222222222222222222222222222-2222222222222222-01"
    observer = Joined()
    async with Harness(merger_app(), middleware=[observer]) as h:
        start = h.clock.now()
        # given a join holding one part, each part in a trace of its own
        await h.transport.publish([part(Left(key="k", value=1), "left-1", left_trace)])
        await h.settle()
        assert await h.state("merger", "_join:pair", "k") == {
            "status": "open",
            "parts": {"Left": {"id": "left-1", "data": {"key": "k", "value": 1}, "version": 1,
                               "traceparent": left_trace}},
            "timer": True,
        }  # fmt: skip

        # when the other part arrives
        await h.transport.publish([part(Right(key="k", value=2), "right-1", right_trace)])
        combined = await h.wait_for(Combined)
        await h.settle()
        pending = await h.runtime.workers["merger"].store.list_timers()

    # then the join runs once, its timeout is cancelled, and observers learn which parts (and
    # traces) it joined
    assert combined.data == {"key": "k", "total": 3}
    assert pending == []
    assert observer.seen == [
        ("done", None, [TimerChange("set", "join:pair", "k", start + 10)]),
        ("done", [("left-1", left_trace), ("right-1", right_trace)],
         [TimerChange("cancel", "join:pair", "k")]),
    ]  # fmt: skip


# what the join function does ----------------------------------------------------------------------


async def test_a_join_emitting_an_undeclared_event_is_dead_lettered_naming_the_join() -> None:
    async with Harness(merger_app(strays=True)) as h:
        first = await h.call("merger", Left(key="k", value=1))

        # when the join completes and emits what it does not declare
        result = await h.call("merger", Right(key="k", value=2), state=first.state)

    # then it fails for good, the error naming the join and what it declares
    assert result.outcome == "dead_letter"
    assert result.failure is not None
    assert result.failure.error == (
        "pair emitted Stray, which its declaration does not list in emits (Combined)"
    )


async def test_a_join_failing_for_good_is_announced_under_its_name() -> None:
    async with Harness(merger_app(fails=True)) as h:
        first = await h.call("merger", Left(key="k", value=1), correlation_id="tx")

        # when the join completes and its function fails for good
        result = await h.call("merger", Right(key="k", value=2), state=first.state,
                              correlation_id="tx")  # fmt: skip

    # then the part is dead-lettered and the failure announced as the join's
    assert result.outcome == "dead_letter"
    (failed,) = result.emitted
    assert isinstance(failed, HandlerFailed)
    assert (failed.service, failed.handler, failed.failed_event_id) == (
        "merger",
        "pair",
        result.envelope.id,
    )
    assert failed.reason == "cannot combine"


# parts kept before an upgrade ---------------------------------------------------------------------


async def test_a_part_kept_before_its_type_was_upgraded_is_read_through_its_upcasters() -> None:
    # given a join holding a Weighed part kept at version 1 (in kilograms), before parts said
    # their version, and one holding a part kept at version 2 (in grams)
    old = {"status": "open", "timer": False,
           "parts": {"Weighed": {"id": "w1", "data": {"key": "old", "kg": 2}}}}  # fmt: skip
    new = {"status": "open", "timer": False,
           "parts": {"Weighed": {"id": "w2", "data": {"key": "new", "grams": 500},
                                 "version": 2}}}  # fmt: skip
    async with Harness(merger_app()) as h:
        # when each join completes
        packed = [
            await h.call("merger", Labelled(key=key), state={"_join:pack": {key: doc}})
            for key, doc in (("old", old), ("new", new))
        ]

    # then the old part was upcast from version 1, the new one read as it is
    assert [result.outcome for result in packed] == ["done", "done"]
    assert [result.emitted for result in packed] == [
        [Packed(key="old", grams=2000)],
        [Packed(key="new", grams=500)],
    ]


# a join started by an event of its own ------------------------------------------------------------


class Opened(Event):
    key: str


class Up(Event):
    pass


class Down(Event):
    pass


def opened_app() -> App:
    """Two joins whose timeouts start when Opened arrives: one on a key field, one on the
    transaction."""
    merger = Service("merger")

    @merger.join(Left, Right, key="key", within=10, starts_on=Opened, emits=[Combined])
    async def pair(parts: Parts, ctx: Context) -> Combined:
        return Combined(key=parts.key, total=parts[Left].value + parts[Right].value)

    @merger.join(Up, Down, within=20, starts_on=Opened)
    async def trip(parts: Parts, ctx: Context) -> None:
        return None

    return App("opening", [merger])


async def test_a_join_started_by_its_own_event_times_from_that_event_once() -> None:
    async with Harness(opened_app()) as h:
        # when the event starting the join arrives
        opened = await h.call("merger", Opened(key="k"), correlation_id="tx")
        # and again, then its first part
        again = await h.call("merger", Opened(key="k"), state=opened.state, correlation_id="tx")
        left = await h.call("merger", Left(key="k", value=1), state=again.state)

    # then the join is kept open with no part, its timeout running from then, once
    assert opened.stored("_join:pair", "k") == {"status": "open", "parts": {}, "timer": True}
    assert opened.stored("_join:trip", "tx") == {"status": "open", "parts": {}, "timer": True}
    assert opened.timers == [PendingTimer("join:pair", "k", 10.0),
                             PendingTimer("join:trip", "tx", 20.0)]  # fmt: skip
    assert again.stored("_join:pair", "k") == opened.stored("_join:pair", "k")
    assert again.timers == left.timers == []
    assert left.stored("_join:pair", "k") == {
        "status": "open", "parts": {"Left": kept(left.envelope)}, "timer": True
    }  # fmt: skip


async def test_a_join_started_by_its_own_event_times_out_counting_from_it() -> None:
    async with Harness(opened_app()) as h:
        # given a join started at 0 s whose first part arrives at 5 s
        await h.publish(Opened(key="k"), correlation_id="tx")
        await h.advance(5)
        await h.publish(Left(key="k", value=1), correlation_id="tx")
        await h.settle()

        # when 9.5 s have passed since the start, then 10.5 s
        await h.advance(4.5)
        before = list(h.published("choreograph.JoinTimedOut"))
        await h.advance(1)
        timed_out = await h.wait_for("choreograph.JoinTimedOut")

    # then it times out at 10 s, missing its Right part
    assert before == []
    assert timed_out.data["missing"] == ["Right"]


async def test_a_join_on_the_transaction_keeps_its_parts_under_the_transactions_id() -> None:
    async with Harness(opened_app()) as h:
        # when both parts of a join keyed by nothing arrive in transaction tx
        up = await h.call("merger", Up(), correlation_id="tx")
        down = await h.call("merger", Down(), state=up.state, correlation_id="tx")

    # then it kept the first under the transaction's id, and completed with the second
    assert up.stored("_join:trip", "tx") == {
        "status": "open", "parts": {"Up": kept(up.envelope)}, "timer": True
    }  # fmt: skip
    done = down.stored("_join:trip", "tx")
    assert done is not None
    assert done["status"] == "done"
