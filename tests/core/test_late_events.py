"""Late events: an event that reaches a service after its transaction ended there.

The rule (docs/guarantees.md, "Late events"): a service remembers the transactions that ended
(a terminal event of the app reached it or left it); an ordinary handler no longer runs for them
and the event is settled with the outcome ``late``; compensations, handlers of terminal events,
the runtime's failure announcements and handlers declared ``after_end`` still run.
"""

from __future__ import annotations

from choreograph import (
    App,
    CompensationFailed,
    Context,
    DeadlineExpired,
    Event,
    PermanentFailure,
    Service,
)
from choreograph.envelope import encode, new_envelope
from choreograph.observe.lint import lint
from choreograph.testing import Harness
from choreograph.transport import Message
from tests.drone.conftest import Recorder


class TripRequested(Event):
    trip: str


class SeatBooked(Event):
    trip: str


class TripCompleted(Event):
    trip: str


class TripFailed(Event):
    trip: str


class Reminder(Event):
    trip: str


def trip_app(calls: list[str]) -> App:
    """booking books a seat and releases it on failure; audit keeps a trail of requests (also
    after the end: ``after_end``) and outcomes; alerts hears about failed compensations; watcher
    keeps a deadline; counter counts requests (no compensation, timer nor terminal handler)."""
    booking = Service("booking")
    audit = Service("audit")
    alerts = Service("alerts")
    watcher = Service("watcher")
    counter = Service("counter")

    @booking.on(TripRequested, emits=[SeatBooked])
    async def book_seat(event: TripRequested, ctx: Context) -> SeatBooked:
        calls.append(f"book {event.trip}")
        await ctx.state.put("seat", event.trip, {"status": "booked"})
        return SeatBooked(trip=event.trip)

    @booking.compensate(TripFailed, undoes=book_seat)
    async def release_seat(event: TripFailed, ctx: Context) -> None:
        calls.append(f"release {event.trip}")
        if event.trip == "broken":
            raise PermanentFailure("the seat system is down")
        if await ctx.state.get("seat", event.trip) is not None:
            await ctx.state.put("seat", event.trip, {"status": "released"})

    @booking.on(TripCompleted)
    async def close_trip(event: TripCompleted, ctx: Context) -> None:
        calls.append(f"close {event.trip}")

    @audit.on(TripRequested, after_end=True)
    async def log_request(event: TripRequested, ctx: Context) -> None:
        calls.append(f"audit {event.trip}")

    @audit.on(TripCompleted)
    async def log_completed(event: TripCompleted, ctx: Context) -> None:
        calls.append(f"audit completed {event.trip}")

    @counter.on(TripRequested)
    async def count(event: TripRequested, ctx: Context) -> None:
        calls.append(f"count {event.trip}")

    @alerts.on(CompensationFailed)
    async def page_someone(event: CompensationFailed, ctx: Context) -> None:
        calls.append(f"alert {event.compensation}")

    @watcher.deadline(starts_on=TripRequested, expect=[SeatBooked], within=10, emits=[Reminder])
    async def remind(expired: DeadlineExpired, ctx: Context) -> Reminder:
        calls.append(f"remind {expired.key}")
        return Reminder(trip=expired.key)

    return App(
        "trips", [booking, audit, alerts, watcher, counter], terminal=[TripCompleted, TripFailed]
    )


async def started(calls: list[str]) -> tuple[Harness, Recorder]:
    recorder = Recorder()
    harness = Harness(trip_app(calls), middleware=[recorder])
    await harness.__aenter__()
    return harness, recorder


def outcomes(recorder: Recorder, service: str, trip: str) -> list[tuple[str, str]]:
    return [(h.event_type, h.kind) for h in recorder.of(service) if h.correlation_id == trip]


async def test_a_step_arriving_after_the_failure_does_not_run_and_is_recorded_late() -> None:
    calls: list[str] = []
    h, recorder = await started(calls)
    try:
        # given the trip failed before its request reached booking
        await h.publish(TripFailed(trip="t1"), correlation_id="t1")
        await h.settle()
        # when the request arrives
        await h.publish(TripRequested(trip="t1"), correlation_id="t1")
        await h.settle()
        # then no seat is booked, the compensation ran, and the request is settled as late
        assert await h.state("booking", "seat", "t1") is None
        assert "book t1" not in calls and "release t1" in calls
        assert outcomes(recorder, "booking", "t1") == [
            ("TripFailed", "done"),
            ("TripRequested", "late"),
        ]
        assert not h.published(SeatBooked, "t1")
    finally:
        await h.__aexit__(None, None, None)


async def test_a_step_that_ran_before_the_failure_is_compensated() -> None:
    calls: list[str] = []
    h, _ = await started(calls)
    try:
        # given the request was handled
        await h.publish(TripRequested(trip="t2"), correlation_id="t2")
        await h.wait_for(SeatBooked, correlation_id="t2")
        # when the trip fails
        await h.publish(TripFailed(trip="t2"), correlation_id="t2")
        await h.settle()
        # then the seat is released
        assert await h.state("booking", "seat", "t2") == {"status": "released"}
    finally:
        await h.__aexit__(None, None, None)


async def test_handlers_that_must_see_the_end_still_run_after_it() -> None:
    calls: list[str] = []
    h, recorder = await started(calls)
    try:
        # given a trip that completed, and one whose compensation fails for good
        await h.publish(TripCompleted(trip="t3"), correlation_id="t3")
        await h.publish(TripFailed(trip="broken"), correlation_id="broken")
        await h.wait_for(CompensationFailed, correlation_id="broken")
        await h.settle()
        # when a request and a second terminal event arrive after the end
        await h.publish(TripRequested(trip="t3"), correlation_id="t3")
        await h.publish(TripFailed(trip="t3"), correlation_id="t3")
        await h.settle()
        # then audit (after_end), the compensation, and the alert about the failed compensation
        # ran; booking's own step did not
        assert "audit t3" in calls and "release t3" in calls and "close t3" in calls
        assert "alert release_seat" in calls
        assert "book t3" not in calls
        assert ("TripRequested", "late") in outcomes(recorder, "booking", "t3")
        # (audit knew t3 had ended: the request ran because of after_end, not by ignorance)
        assert outcomes(recorder, "audit", "t3") == [
            ("TripCompleted", "done"),
            ("TripRequested", "done"),
        ]
    finally:
        await h.__aexit__(None, None, None)


async def test_a_late_event_starts_no_deadline() -> None:
    calls: list[str] = []
    h, recorder = await started(calls)
    try:
        # given the trip ended before its request reached the watcher
        await h.publish(TripFailed(trip="t4"), correlation_id="t4")
        await h.publish(TripRequested(trip="t4"), correlation_id="t4")
        await h.settle()
        # when the deadline would have passed
        await h.advance(15)
        # then no deadline was started, so none fires
        assert ("TripRequested", "late") in outcomes(recorder, "watcher", "t4")
        assert not h.published(Reminder, "t4") and "remind t4" not in calls
    finally:
        await h.__aexit__(None, None, None)


async def test_a_copy_of_a_late_event_is_a_duplicate() -> None:
    calls: list[str] = []
    h, recorder = await started(calls)
    try:
        await h.publish(TripFailed(trip="t5"), correlation_id="t5")
        await h.settle()
        request = new_envelope(
            TripRequested.event_type, {"trip": "t5"}, source="test", correlation_id="t5"
        )
        message = Message(request.id, request.type, encode(request))
        # when the same request is delivered twice
        await h.transport.publish([message])
        await h.transport.publish([message])
        await h.settle()
        # then the first copy is late and the second a duplicate
        assert outcomes(recorder, "booking", "t5") == [
            ("TripFailed", "done"),
            ("TripRequested", "late"),
            ("TripRequested", "duplicate"),
        ]
    finally:
        await h.__aexit__(None, None, None)


async def test_only_services_with_something_to_undo_or_cancel_are_sent_the_end() -> None:
    # given the services of the app
    app = trip_app([])
    terminal = {TripCompleted, TripFailed}
    # then those with compensations (booking) or timers (watcher) get every terminal event;
    # audit gets the one it handles; counter and alerts, with neither, get none
    sent = {name: app.subscriptions(s) & terminal for name, s in app.services.items()}
    assert sent == {
        "booking": terminal,
        "watcher": terminal,
        "audit": {TripCompleted},
        "alerts": set(),
        "counter": set(),
    }
    calls: list[str] = []
    h, recorder = await started(calls)
    try:
        # when a request arrives after its trip failed
        await h.publish(TripFailed(trip="t6"), correlation_id="t6")
        await h.settle()
        await h.publish(TripRequested(trip="t6"), correlation_id="t6")
        await h.settle()
        # then counter, which never learnt of the end, counts it; booking does not book
        assert "count t6" in calls and "book t6" not in calls
        assert outcomes(recorder, "counter", "t6") == [("TripRequested", "done")]
    finally:
        await h.__aexit__(None, None, None)


def test_lint_warns_of_a_compensation_that_can_run_before_its_step() -> None:
    # given a compensation on an event that does not end the transaction
    hotel = Service("hotel")

    @hotel.on(TripRequested, emits=[SeatBooked])
    async def book_room(event: TripRequested, ctx: Context) -> None:
        return None

    @hotel.compensate(Reminder, undoes=book_room)
    async def cancel_room(event: Reminder, ctx: Context) -> None:
        return None

    early = App("trips", [hotel], terminal=[TripCompleted, TripFailed])
    # then lint says so; declared on a terminal failure, it does not
    assert [f.code for f in lint(early) if f.code == "compensation-before-end"] == [
        "compensation-before-end"
    ]
    assert not [f for f in lint(trip_app([])) if f.code == "compensation-before-end"]
