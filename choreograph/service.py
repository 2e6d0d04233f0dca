"""The programming model: a :class:`Service` declares what it reacts to and what it may emit.

Declarations are plain data (:class:`HandlerSpec`, :class:`JoinSpec`, :class:`DeadlineSpec`), so the
graph, lint and AsyncAPI export read them without running anything::

    package = Service("package")

    @package.on(DeliveryRequested, emits=[PackageReady, PackageRejected])
    async def create_package(event: DeliveryRequested, ctx: Context) -> PackageReady:
        ...

    @package.compensate(DeliveryFailed, undoes=create_package)
    async def release_package(event: DeliveryFailed, ctx: Context) -> None:
        ...

A handler returns the events it emits: ``None``, one event, or a list of events, each an instance
of a type named in ``emits``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar

from choreograph.errors import ConfigurationError
from choreograph.events import DeadlineExpired, Event, JoinTimedOut
from choreograph.retry import DEFAULT_RETRY, RetryPolicy
from choreograph.transport import check_group

if TYPE_CHECKING:
    from sqlalchemy import MetaData

    from choreograph.context import Context

Emitted: TypeAlias = Event | Sequence[Event] | None
HandlerFn: TypeAlias = Callable[[Any, "Context"], Awaitable[Emitted]]
F = TypeVar("F", bound=Callable[..., Awaitable[Emitted]])

CORRELATION = "$correlation"
"""``ordered_by=CORRELATION`` orders a handler's events by their correlation id (the business
transaction) instead of by a field of the event."""


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """``fn`` reacts to ``event``; a compensation undoes the work of the handler ``undoes``.

    A handler runs only while its transaction is open, unless it is a compensation, handles a
    terminal event, or is declared with ``after_end`` (see ``docs/guarantees.md``, late events).
    """

    name: str
    event: type[Event]
    emits: tuple[type[Event], ...]
    fn: HandlerFn
    kind: Literal["handler", "compensation"] = "handler"
    undoes: str | None = None
    retry: RetryPolicy | None = None
    after_end: bool = False
    ordered_by: str | None = None
    """The field of ``event`` (or :data:`CORRELATION`) whose value orders this handler's events:
    see :mod:`choreograph.runtime.ordering`. None: no order is kept."""


@dataclass(frozen=True, slots=True)
class JoinSpec:
    """``fn`` runs once, when every part for one key has arrived, in any order.

    ``key`` names a field present in every part; None joins on the correlation id. With
    ``within`` set, a deadline starts at the first part (or at ``starts_on``, when given); if it
    passes first, ``on_timeout`` runs with a :class:`~choreograph.events.JoinTimedOut` (or, with no
    ``on_timeout``, that event is published). Parts arriving after completion or expiry are ignored
    and recorded.
    """

    name: str
    parts: tuple[type[Event], ...]
    emits: tuple[type[Event], ...]
    fn: Callable[[Parts, Context], Awaitable[Emitted]]
    key: str | None = None
    within: float | None = None
    starts_on: type[Event] | None = None
    on_timeout: Callable[[JoinTimedOut, Context], Awaitable[Emitted]] | None = None
    retry: RetryPolicy | None = None


@dataclass(frozen=True, slots=True)
class DeadlineSpec:
    """When ``starts_on`` arrives, expect one of ``expect`` for the same correlation id within
    ``within`` seconds; otherwise ``fn`` runs with a :class:`~choreograph.events.DeadlineExpired`.

    The deadline is cancelled by an awaited event, and when the transaction ends (a terminal event
    of the app arrives).
    """

    name: str
    starts_on: type[Event]
    expect: tuple[type[Event], ...]
    within: float
    emits: tuple[type[Event], ...]
    fn: Callable[[DeadlineExpired, Context], Awaitable[Emitted]]
    retry: RetryPolicy | None = None


class Parts:
    """The parts a join collected, by event class: ``parts[PackageReady]``."""

    __slots__ = ("_by_type", "key")

    def __init__(self, key: str, by_type: dict[type[Event], Event]) -> None:
        self.key = key
        self._by_type = by_type

    def __getitem__(self, cls: type[E]) -> E:
        return self._by_type[cls]  # type: ignore[return-value]

    def __iter__(self) -> Any:
        return iter(self._by_type.values())

    def __len__(self) -> int:
        return len(self._by_type)


E = TypeVar("E", bound=Event)


def _event_classes(what: str, items: Iterable[Any]) -> tuple[type[Event], ...]:
    found = tuple(items)
    for item in found:
        if not (isinstance(item, type) and issubclass(item, Event)):
            raise ConfigurationError(f"{what}: {item!r} is not an Event subclass")
    return found


def _check_async(fn: Callable[..., Any]) -> None:
    if not inspect.iscoroutinefunction(fn):
        raise ConfigurationError(f"handler {fn.__qualname__} must be declared with 'async def'")


class Service:
    """A named participant of a choreography. Its name is its consumer group on the bus."""

    def __init__(
        self,
        name: str,
        *,
        emits: Iterable[type[Event]] = (),
        retry: RetryPolicy = DEFAULT_RETRY,
        description: str = "",
        tables: MetaData | None = None,
    ) -> None:
        """``emits`` lists events the service publishes from outside its handlers (e.g. from an
        HTTP request through :meth:`Runtime.unit_of_work`). ``tables`` is the SQLAlchemy
        ``MetaData`` of the service's own tables (``choreograph[sqlalchemy]``): they live in its
        store, and those missing are created when the service starts (changes: Alembic)."""
        self.name = check_group(name)
        self.emits_outside = _event_classes(f"{name} emits", emits)
        self.retry = retry
        self.description = description
        self.tables = tables
        self.handlers: dict[type[Event], HandlerSpec] = {}
        self.joins: dict[str, JoinSpec] = {}
        self.deadlines: dict[str, DeadlineSpec] = {}

    def __repr__(self) -> str:
        return f"Service({self.name!r})"

    # declarations --------------------------------------------------------------------------------

    def on(
        self,
        event: type[Event],
        *,
        emits: Iterable[type[Event]] = (),
        retry: RetryPolicy | None = None,
        after_end: bool = False,
        ordered_by: str | None = None,
    ) -> Callable[[F], F]:
        """Declare a handler of ``event`` that may emit events of the types in ``emits``.

        An event whose transaction has already ended (a terminal event of the app reached this
        service first) is *late*: the handler does not run for it, unless ``after_end`` is set
        (for work that must see every event, such as an audit trail).

        ``ordered_by`` names a field of ``event`` (or is :data:`CORRELATION`): events with the
        same value of it, for this and every other ordered handler of the service, are handled
        one after the other in the order they arrived; different values in parallel
        (``docs/ordering.md``).
        """
        return self._handler(event, emits, retry, "handler", None, after_end, ordered_by)

    def compensate(
        self,
        event: type[Event],
        *,
        undoes: Callable[..., Any] | str,
        emits: Iterable[type[Event]] = (),
        retry: RetryPolicy | None = None,
        ordered_by: str | None = None,
    ) -> Callable[[F], F]:
        """Declare a compensation: when ``event`` (a failure) arrives, undo what ``undoes`` did.

        A compensation runs even when its transaction has already ended, and the runtime never
        runs ``undoes`` for a transaction that ended first, so whatever the order in which the
        step and the failure arrive, work done is undone and no work starts after the end.
        Compensations must be idempotent; they are retried like handlers, and one that finally
        fails is dead-lettered and announced with a ``CompensationFailed`` event.
        ``ordered_by`` as in :meth:`on`.
        """
        target = undoes if isinstance(undoes, str) else undoes.__name__
        known = {spec.name for spec in self.handlers.values()} | set(self.joins)
        if target not in known:
            raise ConfigurationError(
                f"{self.name}: compensation for {event.__name__} undoes {target!r}, "
                "which is not a handler or join of this service (declare it first)"
            )
        return self._handler(event, emits, retry, "compensation", target, ordered_by=ordered_by)

    def join(
        self,
        *parts: type[Event],
        emits: Iterable[type[Event]] = (),
        key: str | None = None,
        within: float | None = None,
        starts_on: type[Event] | None = None,
        on_timeout: Callable[[JoinTimedOut, Context], Awaitable[Emitted]] | None = None,
        retry: RetryPolicy | None = None,
    ) -> Callable[[Callable[[Parts, Context], Awaitable[Emitted]]], Any]:
        """Declare a join of ``parts`` (at least two event types) for the same key."""
        part_types = _event_classes(f"{self.name}.join parts", parts)
        if len(set(part_types)) < 2 or len(set(part_types)) != len(part_types):
            raise ConfigurationError(f"{self.name}: a join needs two or more distinct event types")
        if within is not None and within <= 0:
            raise ConfigurationError(f"{self.name}: join 'within' must be positive seconds")
        if starts_on is not None and within is None:
            raise ConfigurationError(f"{self.name}: join 'starts_on' needs 'within'")
        if key is not None:
            for cls in (*part_types, *((starts_on,) if starts_on else ())):
                if key not in cls.model_fields:
                    raise ConfigurationError(
                        f"{self.name}: join key {key!r} is not a field of {cls.__name__}"
                    )
        for cls in part_types:
            self._claim(cls)
        emitted = _event_classes(f"{self.name}.join emits", emits)
        if on_timeout is not None:
            _check_async(on_timeout)

        def register(fn: Callable[[Parts, Context], Awaitable[Emitted]]) -> Any:
            _check_async(fn)
            if fn.__name__ in self.joins:
                raise ConfigurationError(f"{self.name}: a join named {fn.__name__} exists")
            self.joins[fn.__name__] = JoinSpec(
                fn.__name__, part_types, emitted, fn, key, within, starts_on, on_timeout, retry
            )
            return fn

        return register

    def deadline(
        self,
        *,
        starts_on: type[Event],
        expect: Iterable[type[Event]],
        within: float,
        emits: Iterable[type[Event]] = (),
        retry: RetryPolicy | None = None,
    ) -> Callable[[F], F]:
        """Declare a deadline; the decorated function handles its expiry."""
        (start,) = _event_classes(f"{self.name}.deadline starts_on", [starts_on])
        expected = _event_classes(f"{self.name}.deadline expect", expect)
        if not expected:
            raise ConfigurationError(f"{self.name}: a deadline must expect at least one event")
        if within <= 0:
            raise ConfigurationError(f"{self.name}: deadline 'within' must be positive seconds")
        emitted = _event_classes(f"{self.name}.deadline emits", emits)

        def register(fn: F) -> F:
            _check_async(fn)
            if fn.__name__ in self.deadlines:
                raise ConfigurationError(f"{self.name}: a deadline named {fn.__name__} exists")
            self.deadlines[fn.__name__] = DeadlineSpec(
                fn.__name__, start, expected, within, emitted, fn, retry
            )
            return fn

        return register

    def _claim(self, event: type[Event]) -> None:
        if event in self.handlers or any(event in j.parts for j in self.joins.values()):
            raise ConfigurationError(
                f"{self.name}: {event.__name__} already has a handler or join in this service"
            )

    def _handler(
        self,
        event: type[Event],
        emits: Iterable[type[Event]],
        retry: RetryPolicy | None,
        kind: Literal["handler", "compensation"],
        undoes: str | None,
        after_end: bool = False,
        ordered_by: str | None = None,
    ) -> Callable[[F], F]:
        (cls,) = _event_classes(f"{self.name}.{kind}", [event])
        self._claim(cls)
        emitted = _event_classes(f"{self.name}.{kind} emits", emits)
        if ordered_by not in (None, CORRELATION, *cls.model_fields):
            known = ", ".join(cls.model_fields) or "none"
            raise ConfigurationError(
                f"{self.name}: ordered_by {ordered_by!r} is not a field of {cls.__name__} "
                f"(its fields: {known}; or CORRELATION for the correlation id)"
            )

        def register(fn: F) -> F:
            _check_async(fn)
            self.handlers[cls] = HandlerSpec(
                fn.__name__, cls, emitted, fn, kind, undoes, retry, after_end, ordered_by
            )
            return fn

        return register

    # inspection ----------------------------------------------------------------------------------

    def consumes(self) -> set[type[Event]]:
        """Every event type this service must receive (its subscriptions)."""
        types: set[type[Event]] = set(self.handlers)
        for join in self.joins.values():
            types.update(join.parts)
            if join.starts_on is not None:
                types.add(join.starts_on)
        for deadline in self.deadlines.values():
            types.add(deadline.starts_on)
            types.update(deadline.expect)
        return types

    def emits(self) -> set[type[Event]]:
        """Every event type this service may publish (the runtime's own events included)."""
        types: set[type[Event]] = set(self.emits_outside)
        for spec in self.handlers.values():
            types.update(spec.emits)
        for join in self.joins.values():
            types.update(join.emits)
            if join.within is not None and join.on_timeout is None:
                types.add(JoinTimedOut)
        for deadline in self.deadlines.values():
            types.update(deadline.emits)
        return types

    def has_timers(self) -> bool:
        return bool(self.deadlines) or any(j.within for j in self.joins.values())

    def has_compensations(self) -> bool:
        return any(spec.kind == "compensation" for spec in self.handlers.values())
