"""The :class:`Runtime`: runs some or all services of an app against one transport."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from choreograph.app import App
from choreograph.clock import SYSTEM_CLOCK, Clock
from choreograph.context import (
    State,
    connection_of,
    flush_session,
    release_session,
    session_of,
)
from choreograph.envelope import Envelope, encode, new_envelope
from choreograph.errors import ConfigurationError
from choreograph.events import Event
from choreograph.middleware import Middleware
from choreograph.runtime.hooks import Hooks
from choreograph.runtime.worker import ServiceWorker, WorkerSettings
from choreograph.service import Service
from choreograph.store import StoreTx, check_not_shared, store_from_url
from choreograph.transport import Message, Transport, transport_from_url

if TYPE_CHECKING:
    from choreograph.orm import TransactionSession

log = logging.getLogger("choreograph.runtime")

DEFAULT_STORE_URL = "sqlite:///.choreograph/{service}.db"


@dataclass(slots=True)
class UnitOfWork:
    """State changes and emitted events of work started outside a handler (an HTTP request),
    committed together. See :meth:`Runtime.unit_of_work`."""

    state: State
    correlation_id: str
    _emitted: list[Event] = field(default_factory=list)

    @property
    def connection(self) -> Any:
        """The store transaction's connection (as :attr:`Context.connection`)."""
        return connection_of(self.state)

    @property
    def session(self) -> TransactionSession:
        """A SQLAlchemy session on it (as :attr:`Context.session`), flushed before the commit."""
        return session_of(self.state)

    def emit(self, event: Event) -> None:
        self._emitted.append(event)


class Runtime:
    """Runs services of ``app``: each one a consumer group on ``transport`` with its own store.

    ``store`` is a URL template where ``{service}`` stands for the service name (default: one
    SQLite file per service under ``.choreograph/``). ``services`` limits which services run in
    this process; the groups of all services are declared on the bus at start, so events published
    before a service's own process starts are kept for it.
    """

    def __init__(
        self,
        app: App,
        *,
        transport: Transport | str | None = None,
        store: str = DEFAULT_STORE_URL,
        services: Iterable[str] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        middleware: Sequence[Middleware] = (),
        settings: WorkerSettings | None = None,
        service_settings: dict[str, WorkerSettings] | None = None,
    ) -> None:
        self.app = app
        self.transport = (
            transport if isinstance(transport, Transport) else transport_from_url(transport)
        )
        self.store_url = store
        self.clock = clock
        self.hooks = Hooks(middleware)
        self.settings = settings or WorkerSettings()
        self.service_settings = dict(service_settings or {})
        names = list(app.services) if services is None else list(services)
        for name in names:
            app.service(name)  # raises a clear error for an unknown name
        check_not_shared(store, names)
        self._selected = names
        self.workers: dict[str, ServiceWorker] = {}
        self._started = False
        self._declared = False

    @property
    def started(self) -> bool:
        """True from the end of :meth:`start` (bus connected, groups declared, every selected
        service running) until :meth:`stop` begins."""
        return self._started

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        """The middleware this runtime calls, in order (through :attr:`hooks`)."""
        return self.hooks.middleware

    async def start(self) -> None:
        await self.transport.connect()
        await declare_groups(self.transport, self.app)
        self._declared = True
        await self.hooks.start(self)
        for name in self._selected:
            await self.add_service(self.app.service(name))
        self._started = True

    async def stop(self) -> None:
        self._started = False
        for name in list(self.workers):
            await self.remove_service(name)
        await self.hooks.stop()
        await self.transport.close()
        self._started = False

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def add_service(self, service: Service) -> ServiceWorker:
        """Start a service while the others run (hot add). Its group is declared first."""
        if service.name in self.workers:
            raise ConfigurationError(f"service {service.name} is already running here")
        if self.app.services.get(service.name) is not service:
            self.app.services[service.name] = service
        worker = ServiceWorker(
            self.app,
            service,
            self.transport,
            store_from_url(self.store_url, service.name),
            clock=self.clock,
            hooks=self.hooks,
            settings=self.service_settings.get(service.name, self.settings),
        )
        await worker.start()
        self.workers[service.name] = worker
        log.info("service %s started (%s)", service.name, ", ".join(sorted(worker.handling.topics)))
        return worker

    async def remove_service(self, name: str) -> None:
        """Stop one service gracefully (hot remove); its group keeps its messages."""
        worker = self.workers.pop(name, None)
        if worker is None:
            raise ConfigurationError(f"service {name} is not running here")
        await worker.stop()
        log.info("service %s stopped", name)

    def worker(self, name: str) -> ServiceWorker:
        try:
            return self.workers[name]
        except KeyError:
            raise ConfigurationError(f"service {name} is not running in this runtime") from None

    @asynccontextmanager
    async def unit_of_work(
        self, service: str, correlation_id: str | None = None
    ) -> AsyncIterator[UnitOfWork]:
        """Change ``service``'s state and emit events atomically, from outside any handler::

            async with runtime.unit_of_work("ingestion", correlation_id=delivery_id) as uow:
                await uow.state.put("request", delivery_id, {...})
                uow.emit(DeliveryRequested(...))

        The events start (or continue) the transaction ``correlation_id``; they are published
        right after the commit, or by the outbox relay if that fails. ``uow.connection`` and
        ``uow.session`` write the service's own tables in the same transaction (the session is
        flushed before the commit); an exception leaving the block rolls everything back. In a
        web framework, open it inside the endpoint, so that the commit is over before the answer.
        """
        worker = self.worker(service)
        ready: list[Message] = []
        async with worker.store.transaction() as tx:
            uow = UnitOfWork(State(tx), correlation_id or "")
            succeeded = False
            try:
                yield uow
                await flush_session(uow.state)
                succeeded = True
            finally:
                await release_session(uow.state, succeeded=succeeded)
            ready = await self._outbox(worker, tx, uow)
        await worker._publish(ready)

    async def _outbox(self, worker: ServiceWorker, tx: StoreTx, uow: UnitOfWork) -> list[Message]:
        allowed = worker.service.emits()
        for event in uow._emitted:
            if type(event) not in allowed:
                raise ConfigurationError(
                    f"{worker.name} does not declare that it emits {type(event).__name__}"
                )
        envelopes = [
            (worker.handling.envelope_for(None, event, uow.correlation_id), 0.0)
            for event in uow._emitted
        ]
        return await worker.handling.stage(tx, envelopes)

    async def publish(self, event: Event, *, source: str, correlation_id: str = "") -> Envelope:
        """Publish one event straight to the bus, with no store (scripts, the CLI, tests).

        The app's groups are declared first, so the event is kept for every service that
        consumes it even when none of them has started yet.
        """
        if not self._declared:
            await self.transport.connect()
            await declare_groups(self.transport, self.app)
            self._declared = True
        envelope = new_envelope(
            event.event_type,
            event.to_data(),
            source=source,
            correlation_id=correlation_id,
            dataschema=event.dataschema(),
            extensions=event.envelope_extensions(),
        )
        envelope = self.hooks.stamp(None, envelope)
        await self.transport.publish([Message(envelope.id, envelope.type, encode(envelope))])
        return envelope

    async def run_until_signalled(self) -> None:
        """Run until SIGINT or SIGTERM, then shut down gracefully."""
        await wait_for_signal()


async def declare_groups(transport: Transport, app: App) -> None:
    """Declare the group of every service of ``app`` with the topics it consumes, so that events
    published from now on are kept for each service, running or not (idempotent). External
    participants get theirs too: what they consume waits for them from the app's first start."""
    for service in app.services.values():
        topics = {cls.event_type for cls in app.subscriptions(service)}
        if topics:
            await transport.declare_group(service.name, topics)
    for participant in app.external.values():
        topics = {cls.event_type for cls in participant.consumes}
        if topics:
            await transport.declare_group(participant.name, topics)


async def wait_for_signal() -> None:
    """Return when the process receives SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
