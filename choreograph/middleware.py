"""Hooks around handling and publishing, for tracing, metrics and recording.

A middleware subclasses :class:`Middleware` and overrides the hooks it needs. The runtime calls
``around_handle`` as an onion (the first middleware is outermost), ``stamp`` on every envelope it
is about to publish, and ``on_outcome`` once per settled message or timer. It calls them through
one object, :class:`choreograph.runtime.hooks.Hooks`, which says which calls are guarded against
a failing observer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from choreograph.app import App
from choreograph.context import Context
from choreograph.envelope import Envelope
from choreograph.events import Event
from choreograph.transport import Failure, Message, Transport

Next = Callable[[], Awaitable[list[Event]]]
OutcomeKind = Literal["done", "duplicate", "retry", "dead_letter", "ignored", "late"]
Checkpoint = Literal["handled", "committed", "published", "settled"]


@dataclass(slots=True)
class Outcome:
    """What became of one handling."""

    kind: OutcomeKind
    delay: float = 0.0
    """For ``retry``: seconds until the next attempt."""
    failure: Failure | None = None
    """For ``retry`` and ``dead_letter``: why."""
    emitted: list[Envelope] = field(default_factory=list)
    note: str = ""
    """For ``ignored`` and ``late``: why nothing ran (e.g. a join part arriving after the join
    ended, an event arriving after its transaction ended)."""
    ready: list[Message] = field(default_factory=list, repr=False)
    """The encoded events to publish right after the commit (``emitted`` minus delayed ones)."""


class WorkerView(Protocol):
    """What middleware may read of one running service."""

    @property
    def inflight(self) -> int:
        """Messages being handled now."""
        ...


class RuntimeView(Protocol):
    """What middleware may read of the runtime that starts it (a :class:`Runtime`)."""

    @property
    def app(self) -> App: ...

    @property
    def transport(self) -> Transport: ...

    @property
    def workers(self) -> Mapping[str, WorkerView]:
        """The services running in this process, by name."""
        ...


class Middleware:
    """Base class; every hook does nothing by default."""

    async def start(self, runtime: RuntimeView) -> None:
        """Called once when the runtime starts, after the transport connected."""

    async def stop(self) -> None:
        """Called once when the runtime stops, after every service stopped."""

    async def around_handle(self, ctx: Context, call_next: Next) -> list[Event]:
        return await call_next()

    def stamp(self, ctx: Context | None, envelope: Envelope) -> Envelope:
        """Adjust an outgoing envelope (e.g. inject trace context). ``ctx`` is None for events
        published from outside a handling."""
        return envelope

    def on_outcome(self, ctx: Context, outcome: Outcome) -> None:
        """Called after the handling's transaction committed."""

    def on_invalid(self, service: str, body: bytes, failure: Failure) -> None:
        """Called when a message is dead-lettered before it could be decoded or routed."""

    def checkpoint(self, service: str, point: Checkpoint) -> None:
        """Called as a batch passes each point of the handling path: ``handled`` (inside the
        transaction, before the commit), ``committed``, ``published`` (before the ack) and
        ``settled``. Crash tests kill the process here."""
