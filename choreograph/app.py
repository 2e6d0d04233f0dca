"""An :class:`App`: the services of one choreography, the participants it does not run, and the
events that end a transaction."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from choreograph.errors import ConfigurationError
from choreograph.events import Event
from choreograph.service import Service, _event_classes
from choreograph.transport import check_group


class External:
    """A participant the app does not run: a service in another language, another team's, a
    script. It is declared so that lint, the graph, AsyncAPI, ``trace`` and the console see the
    events it consumes and emits; its name is its consumer group on the bus, like a service's
    (see ``docs/guide/other-languages.md``)."""

    def __init__(
        self,
        name: str,
        *,
        consumes: Iterable[type[Event]] = (),
        emits: Iterable[type[Event]] = (),
        description: str = "",
    ) -> None:
        self.name = check_group(name)
        self.consumes = _event_classes(f"{name} consumes", consumes)
        self.emits = _event_classes(f"{name} emits", emits)
        if not self.consumes and not self.emits:
            raise ConfigurationError(f"external participant {name}: it consumes and emits nothing")
        self.description = description

    def __repr__(self) -> str:
        return f"External({self.name!r})"


class App:
    """The services of one choreography.

    ``terminal`` names the events that end a transaction (e.g. ``DeliveryCompleted`` and
    ``DeliveryFailed``). Every service with compensations or timers receives them too (see
    :meth:`subscriptions`), and any service that receives one remembers the transaction as ended:
    pending deadlines and joins of that transaction are dropped, and an ordinary handler no longer
    runs for an event of it that arrives later (a *late* event; compensations still run). The
    flow recorder counts a transaction without one as in flight.

    ``external`` declares the participants the app does not run (:class:`External`).
    """

    def __init__(
        self,
        name: str,
        services: Iterable[Service],
        *,
        terminal: Iterable[type[Event]] = (),
        external: Iterable[External] = (),
        description: str = "",
    ) -> None:
        self.name = name
        self.description = description
        self.services: dict[str, Service] = {}
        for service in services:
            if service.name in self.services:
                raise ConfigurationError(f"app {name}: two services are named {service.name!r}")
            self.services[service.name] = service
        self.external: dict[str, External] = {}
        for participant in external:
            if not isinstance(participant, External):
                raise ConfigurationError(f"app {name}: {participant!r} is not an External")
            if participant.name in self.services or participant.name in self.external:
                raise ConfigurationError(
                    f"app {name}: two participants are named {participant.name!r}"
                )
            self.external[participant.name] = participant
        self.terminal: tuple[type[Event], ...] = tuple(terminal)

    def __repr__(self) -> str:
        return f"App({self.name!r}, services={list(self.services)})"

    def service(self, name: str) -> Service:
        try:
            return self.services[name]
        except KeyError:
            known = ", ".join(self.services) or "none"
            raise ConfigurationError(
                f"app {self.name} has no service {name!r}; its services: {known}"
            ) from None

    def event_types(self) -> dict[str, type[Event]]:
        """Every event type the app's services consume or emit, by type name."""
        found: dict[str, type[Event]] = {cls.event_type: cls for cls in self.terminal}
        for service in self.services.values():
            for cls in service.consumes() | service.emits():
                found[cls.event_type] = cls
        for participant in self.external.values():
            for cls in (*participant.consumes, *participant.emits):
                found.setdefault(cls.event_type, cls)
        return found

    def subscriptions(self, service: Service) -> set[type[Event]]:
        """What ``service`` must receive: its declarations, plus the terminal events when it
        declares compensations or timers, so that it knows which transactions ended: late
        events must not start work its compensations will never undo, and timers of an ended
        transaction must not fire. (A service with neither is not sent them: that would be one
        more delivery per transaction and service, for nothing to undo or cancel; when it
        consumes a terminal event for its own reasons, it remembers the end all the same.)"""
        types = service.consumes()
        if service.has_compensations() or service.has_timers():
            types.update(self.terminal)
        return types


def load_app(spec: str) -> App:
    """Import an app from ``module:attribute`` (or ``module``, whose ``app`` attribute is used)."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import app module {module_name!r}: {exc}") from None
    found = getattr(module, attribute or "app", None)
    if callable(found) and not isinstance(found, App | type):  # a factory, not a class
        try:
            found = found()
        except TypeError as exc:
            raise ConfigurationError(f"cannot call the app factory {spec!r}: {exc}") from None
    if not isinstance(found, App):
        raise ConfigurationError(
            f"{spec!r} is not a choreograph App (expected 'module:attribute' naming an App)"
        )
    return found
