"""A deadline's function writes rows through ctx.session too, in the timer's transaction."""

from __future__ import annotations

from sqlalchemy import String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from choreograph import App, Context, DeadlineExpired, Event, PermanentFailure, Service
from choreograph.pytest_plugin import HarnessFactory


class Asked(Event):
    question: str


class Answered(Event):
    question: str


class Overdue(Event):
    question: str


class DeskTables(DeclarativeBase):
    pass


class Reminder(DeskTables):
    __tablename__ = "reminders"
    question: Mapped[str] = mapped_column(String(64), primary_key=True)


desk = Service("desk", tables=DeskTables.metadata)


@desk.on(Asked)
async def noted(event: Asked, ctx: Context) -> None:
    pass


@desk.deadline(starts_on=Asked, expect=[Answered], within=5, emits=[Overdue])
async def unanswered(expired: DeadlineExpired, ctx: Context) -> Overdue:
    ctx.session.add(Reminder(question=expired.key))
    if expired.key == "refused":
        raise PermanentFailure("its reminder must not stay")
    return Overdue(question=expired.key)


async def test_a_deadline_writes_its_row_with_its_event_and_a_failed_one_leaves_none(
    harness: HarnessFactory,
) -> None:
    h = await harness(App("desk", [desk]))
    for question in ("kept", "refused"):
        await h.publish(Asked(question=question), correlation_id=question)
    await h.advance(6)
    assert [e.correlationid for e in h.published(Overdue)] == ["kept"]
    async with h.runtime.unit_of_work("desk") as uow:
        assert list(await uow.session.scalars(select(Reminder.question))) == ["kept"]
