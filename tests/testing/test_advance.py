"""Harness.advance: however long the quiet stretch, a timer fires at its own virtual time and
what it causes happens then."""

from __future__ import annotations

from choreograph import App, Context, DeadlineExpired, Event, Service
from choreograph.pytest_plugin import HarnessFactory


class Asked(Event):
    key: str


class Answered(Event):
    key: str


class Overdue(Event):
    key: str


def overdue_app() -> App:
    desk = Service("desk")

    @desk.deadline(starts_on=Asked, expect=[Answered], within=3600, emits=[Overdue])
    async def overdue(expired: DeadlineExpired, ctx: Context) -> Overdue:
        return Overdue(key=expired.key)

    @desk.on(Overdue)
    async def note(event: Overdue, ctx: Context) -> None:
        await ctx.state.put("noted", event.key, {"at": ctx.now()})

    return App("desk", [desk])


async def test_an_hour_long_advance_fires_the_deadline_on_time_and_its_effects_follow_at_once(
    harness: HarnessFactory,
) -> None:
    # given a deadline of an hour, started now
    h = await harness(overdue_app())
    started = h.clock.now()
    await h.publish(Asked(key="q"), correlation_id="q")
    # when almost an hour passes, then nothing has expired
    await h.advance(3599.75)
    assert h.published(Overdue) == []
    # when more time passes, in one long advance
    await h.advance(600)
    # then the deadline expired on time and the event it caused was handled at that very time,
    # not at the end of the advance
    assert len(h.published(Overdue, "q")) == 1
    assert await h.state("desk", "noted", "q") == {"at": started + 3600}
