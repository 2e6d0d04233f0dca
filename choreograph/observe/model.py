"""The declared flow of an app, as plain steps: who reacts to which event and what it may emit.

Graph, lint, AsyncAPI and the ``trace`` overlay all read the app through this one model, so they
agree on what the choreography *should* do. Nothing here runs a service.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from choreograph.app import App
from choreograph.context import Context
from choreograph.events import (
    BUILTIN_EVENTS,
    CompensationFailed,
    Event,
    HandlerFailed,
    JoinTimedOut,
)

StepKind = Literal[
    "handler", "compensation", "join", "join_timeout", "deadline", "outside", "external"
]

_FAILURE = re.compile(
    r"(Failed|Failure|Rejected|Unavailable|TimedOut|Expired|Cancelled|Canceled|Aborted|Error)$"
)
#: Events the runtime itself may publish on behalf of any handler.
IMPLICIT_EVENTS: tuple[type[Event], ...] = (HandlerFailed, CompensationFailed)


def is_failure_type(event_type: str) -> bool:
    """Whether an event type announces a failure, judged by its name (``DeliveryFailed``,
    ``PackageRejected``, ``DroneUnavailable``, ``choreograph.JoinTimedOut`` ...)."""
    return bool(_FAILURE.search(event_type.rsplit(".", 1)[-1]))


@dataclass(frozen=True, slots=True)
class Step:
    """One declared reaction of a service.

    ``triggers`` are the event types that run it (for a join: its parts; for a deadline: the event
    that starts it; for a join timeout and an ``outside`` step: none; for an ``external``
    participant, which the app does not run: what it consumes). ``emits`` are the event types it
    may publish; ``within`` is a deadline or join timeout in seconds.
    """

    service: str
    name: str
    kind: StepKind
    triggers: tuple[str, ...]
    emits: tuple[str, ...]
    undoes: str | None = None
    within: float | None = None
    expect: tuple[str, ...] = ()
    starts_on: str | None = None

    @property
    def label(self) -> str:
        return f"{self.service}.{self.name}"


class FlowModel:
    """Every step of ``app``, indexed by the event types that trigger them."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.steps: list[Step] = list(_steps(app))
        self.classes: dict[str, type[Event]] = dict(app.event_types())
        for cls in BUILTIN_EVENTS:
            self.classes.setdefault(cls.event_type, cls)
        self.terminal = frozenset(cls.event_type for cls in app.terminal)

    def reactions(self, event_type: str) -> list[Step]:
        """Steps a published event of ``event_type`` runs (or, for a join, feeds)."""
        return [
            s
            for s in self.steps
            if event_type in s.triggers
            and s.kind in ("handler", "compensation", "join", "external")
        ]

    def deadlines_started_by(self, event_type: str) -> list[Step]:
        return [s for s in self.steps if s.kind == "deadline" and s.starts_on == event_type]

    def join_timeouts_started_by(self, event_type: str) -> list[Step]:
        """Join timeouts started by ``event_type`` (its ``starts_on``, else any part)."""
        found = []
        for step in self.steps:
            if step.kind != "join_timeout":
                continue
            join = self.step(step.service, step.name, "join")
            starts = (step.starts_on,) if step.starts_on else (join.triggers if join else ())
            if event_type in starts:
                found.append(step)
        return found

    def emitters(self, event_type: str) -> list[Step]:
        """Steps that may publish ``event_type`` (the runtime's implicit failures excluded)."""
        return [s for s in self.steps if event_type in s.emits]

    def step(self, service: str, name: str, kind: StepKind | None = None) -> Step | None:
        for step in self.steps:
            if step.service == service and step.name == name and kind in (None, step.kind):
                return step
        return None

    def consumed(self) -> set[str]:
        return {t for s in self.steps for t in s.triggers} | {
            t for s in self.steps if s.kind == "deadline" for t in s.expect
        }

    def emitted(self) -> set[str]:
        return {t for s in self.steps for t in s.emits}

    def services_of(self, kind: StepKind) -> Iterator[Step]:
        return (s for s in self.steps if s.kind == kind)


def timer_kind(app: App | None, ctx: Context) -> str | None:
    """``deadline`` or ``join_timeout`` when ``ctx`` is an expired timer, else None."""
    marked = ctx.extras.get("timer")
    if isinstance(marked, str):
        kind = marked.partition(":")[0]
        return "join_timeout" if kind == "join" else kind
    service = app.services.get(ctx.service) if app is not None else None
    if service is None:
        return None
    if ctx.handler in service.deadlines:
        return "deadline"
    # A timer's context carries a synthetic envelope of its cause: no data, from this service.
    envelope = ctx.envelope
    if ctx.handler in service.joins and not envelope.data and envelope.source == ctx.service:
        return "join_timeout"
    return None


def compensation_of(app: App | None, ctx: Context) -> str | None:
    """The handler a compensation undoes, when ``ctx`` runs a compensation."""
    service = app.services.get(ctx.service) if app is not None else None
    if service is None:
        return None
    for spec in service.handlers.values():
        if spec.name == ctx.handler and spec.event.event_type == ctx.envelope.type:
            return spec.undoes if spec.kind == "compensation" else None
    return None


def step_kind(app: App | None, ctx: Context) -> str:
    """What ran: ``handler``, ``compensation``, ``join``, ``deadline``, ``join_timeout``, or
    ``internal`` (bookkeeping only: a deadline started or stopped, a transaction ended)."""
    timer = timer_kind(app, ctx)
    if timer is not None:
        return timer
    if compensation_of(app, ctx):
        return "compensation"
    service = app.services.get(ctx.service) if app is not None else None
    if service is not None:
        if ctx.handler in service.joins:
            return "join"
        if any(spec.name == ctx.handler for spec in service.handlers.values()):
            return "handler"
    return "internal" if ctx.handler.startswith("on ") else "handler"


def _names(classes: tuple[type[Event], ...] | list[type[Event]]) -> tuple[str, ...]:
    return tuple(cls.event_type for cls in classes)


def _steps(app: App) -> Iterator[Step]:
    for participant in app.external.values():
        yield Step(
            participant.name,
            "external",
            "external",
            _names(participant.consumes),
            _names(participant.emits),
        )
    for service in app.services.values():
        name = service.name
        if service.emits_outside:
            yield Step(name, "outside", "outside", (), _names(service.emits_outside))
        for spec in service.handlers.values():
            yield Step(
                name,
                spec.name,
                spec.kind,
                (spec.event.event_type,),
                _names(spec.emits),
                undoes=spec.undoes,
            )
        for join in service.joins.values():
            starts = join.starts_on.event_type if join.starts_on else None
            yield Step(
                name,
                join.name,
                "join",
                _names(join.parts),
                _names(join.emits),
                within=join.within,
                starts_on=starts,
            )
            if join.within is not None:
                emits = _names(join.emits) if join.on_timeout else (JoinTimedOut.event_type,)
                yield Step(
                    name, join.name, "join_timeout", (), emits, within=join.within, starts_on=starts
                )
        for deadline in service.deadlines.values():
            yield Step(
                name,
                deadline.name,
                "deadline",
                (deadline.starts_on.event_type,),
                _names(deadline.emits),
                within=deadline.within,
                expect=_names(deadline.expect),
                starts_on=deadline.starts_on.event_type,
            )


__all__ = [
    "IMPLICIT_EVENTS",
    "FlowModel",
    "Step",
    "StepKind",
    "compensation_of",
    "is_failure_type",
    "step_kind",
    "timer_kind",
]
