"""Test your own choreographies: run several services together in memory, on a virtual clock.

::

    async with Harness(app) as h:
        await h.publish(DeliveryRequested(...), correlation_id="d1")
        failed = await h.wait_for(DeliveryFailed, correlation_id="d1")   # an Envelope
        await h.advance(30)            # deadlines and delayed retries fire, no waiting
        assert h.published("DeliveryFailed")

Everything is real: the in-memory transport and SQLite-in-memory stores implement the same
contracts as production ones; only time is virtual (it moves when you call :meth:`advance`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from choreograph.app import App
from choreograph.clock import VirtualClock
from choreograph.envelope import Envelope, decode
from choreograph.errors import InvalidMessage
from choreograph.events import Event
from choreograph.middleware import Middleware
from choreograph.runtime.runner import Runtime
from choreograph.runtime.worker import WorkerSettings
from choreograph.transport import DeadLetter, Message
from choreograph.transports.memory import MemoryTransport


class _RecordingTransport(MemoryTransport):
    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock=clock)
        self.record: list[Envelope] = []
        self.changed = asyncio.Event()

    async def publish(self, messages: Sequence[Message]) -> None:
        await super().publish(messages)
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
            busy = any(w.inflight for w in self.runtime.workers.values())
            busy = busy or any(self.transport.busy(name) for name in self.runtime.workers)
            quiet = 0 if busy else quiet + 1
            await asyncio.sleep(0.002)

    async def advance(self, seconds: float) -> None:
        """Move virtual time forward: due timers, delayed emissions and retries happen."""
        await self.settle()
        step = 0.25
        remaining = seconds
        while remaining > 0:
            await self.clock.advance(min(step, remaining))
            remaining -= step
            await self.settle()

    async def dead_letters(self, group: str | None = None) -> list[DeadLetter]:
        return await self.transport.dead_letters(group, 100_000)

    async def state(self, service: str, kind: str, key: str) -> dict[str, Any] | None:
        """Read one document of a service's store (for assertions)."""
        async with self.runtime.unit_of_work(service) as uow:
            return await uow.state.get(kind, key)
