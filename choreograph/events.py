"""Typed events: users declare each event type as a subclass of :class:`Event`.

An event class is a pydantic model. Its *event type* (the CloudEvents ``type`` and the routing key
on every broker) is the class name, or the ``event_type`` class variable when set::

    class PackageReady(Event):
        delivery_id: str
        weight_kg: float

    class DroneScheduled(Event):
        event_type: ClassVar[str] = "drones.DroneScheduled"
        delivery_id: str
        drone_id: str

An event type has a **version** (1 unless declared: ``class DeliveryRequested(Event, version=2)``),
which travels in the envelope's ``dataschema`` (``urn:choreograph:DeliveryRequested:v2``). A
consumer reads an older version through the type's **upcasters**, chained one version at a
time::

    @upcaster(DeliveryRequested, from_version=1)
    def add_priority(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "priority": "standard"}

and a newer version *tolerantly*: as its own version, ignoring fields it does not know; data that
does not read so is a schema violation naming both versions (dead-lettered; replay it after the
upgrade). See ``docs/wire-format.md``, Versions.

An event type may name the field that partitions it across the replicas of a key-partitioned
group (``class AccountDebited(Event, partition_key="account_id")``): its events then carry that
field's value as the envelope's ``partitionkey``; without it, the correlation id partitions them
(``docs/ordering.md``, across replicas).

Payloads are validated when received; unknown fields are ignored so that producers may add fields
without breaking older consumers. Numbers must be finite: NaN and Infinity have no JSON form (they
would travel as ``null`` and fail every consumer), so an event holding one, at any depth, is
refused when it is made. A class that wants them anyway sets
``model_config = ConfigDict(allow_inf_nan=True)`` (and gets ``null`` on the wire).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from choreograph.envelope import check_event_type, schema_uri
from choreograph.errors import ConfigurationError, SchemaViolation

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns the data of one version of an event type into the data of the next version."""
U = TypeVar("U", bound=Upcaster)


class Event(BaseModel):
    """Base class of every event type."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    event_type: ClassVar[str]
    event_version: ClassVar[int] = 1
    """The version of this class's data (``class X(Event, version=2)``); each class declares its
    own, 1 when it does not."""
    event_upcasters: ClassVar[dict[int, Upcaster]] = {}
    """The upcaster from each older version to the next one (see :func:`upcaster`)."""
    event_partition_key: ClassVar[str | None] = None
    """The field whose value is the envelope's ``partitionkey`` (``class X(Event,
    partition_key="account_id")``); None: the correlation id partitions the type's events."""

    def __init_subclass__(
        cls, *, version: int = 1, partition_key: str | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigurationError(f"{cls.__name__}: version must be an integer from 1")
        cls.event_version = version
        cls.event_upcasters = {}
        cls.event_partition_key = partition_key

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "event_type" not in cls.__dict__:
            cls.event_type = cls.__name__
        check_event_type(cls.event_type)
        key = cls.event_partition_key
        if key is not None and key not in cls.model_fields:
            known = ", ".join(cls.model_fields) or "none"
            raise ConfigurationError(
                f"{cls.__name__}: partition_key {key!r} is not a field of the event (fields: "
                f"{known})"
            )

    def envelope_extensions(self) -> dict[str, Any]:
        """The envelope extensions this event carries: its ``partitionkey`` when its type
        declares one."""
        key = self.event_partition_key
        return {} if key is None else {"partitionkey": str(getattr(self, key))}

    @classmethod
    def dataschema(cls) -> str:
        """The envelope's ``dataschema`` for this class's version of its type."""
        return schema_uri(cls.event_type, cls.event_version)

    @classmethod
    def read(cls, data: dict[str, Any], version: int) -> Event:
        """Validate data of ``version`` of this type: upcast first when older, read tolerantly
        (unknown fields ignored) when newer; raise :class:`SchemaViolation` saying why not."""
        current = cls.event_version
        if version < current:
            data = cls._upcast(data, version)
        try:
            return cls.parse_data(data)
        except SchemaViolation as exc:
            if version == current:
                raise
            how = "upcast from" if version < current else "newer than this consumer's"
            raise SchemaViolation(
                f"{exc} (version {version}, {how} version {current}; see docs/wire-format.md, "
                "Versions)"
            ) from None

    @classmethod
    def _upcast(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        for step in range(version, cls.event_version):
            fn = cls.event_upcasters.get(step)
            if fn is None:
                raise SchemaViolation(
                    f"{cls.event_type}: version {version} cannot be read: no upcaster from "
                    f"version {step} (this consumer reads version {cls.event_version})"
                )
            try:
                data = fn(dict(data))
            except Exception as exc:
                raise SchemaViolation(
                    f"{cls.event_type}: the upcaster from version {step} failed: "
                    f"{type(exc).__name__}: {str(exc)[:500]}"
                ) from None
            if not isinstance(data, dict):
                raise SchemaViolation(
                    f"{cls.event_type}: the upcaster from version {step} returned "
                    f"{type(data).__name__}, not a dict"
                )
        return data

    @model_validator(mode="before")
    @classmethod
    def _finite_numbers(cls, data: Any) -> Any:
        # allow_inf_nan covers float fields; this covers numbers inside dicts, lists and Any.
        if cls.model_config.get("allow_inf_nan") is False:
            where = _non_finite(data, "")
            if where is not None:
                raise ValueError(
                    f"{where or 'a value'} is not a finite number (NaN and Infinity have no JSON "
                    "form)"
                )
        return data

    @classmethod
    def parse_data(cls, data: dict[str, Any]) -> Event:
        """Validate a received payload; raise :class:`SchemaViolation` with readable reasons."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
                for err in exc.errors()[:5]
            )
            raise SchemaViolation(f"{cls.event_type}: {problems}") from None

    def to_data(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def upcaster(event: type[Event], *, from_version: int) -> Callable[[U], U]:
    """Declare the function turning ``event``'s data of ``from_version`` into the next version's.

    Upcasters chain: data of version 1 of a version-3 type goes through the upcasters from 1 and
    from 2. An upcaster receives a copy of the data (a dict) and returns the new one; it must not
    depend on anything but the data (it runs again on every redelivery and replay).
    """
    if not (isinstance(event, type) and issubclass(event, Event)):
        raise ConfigurationError(f"upcaster: {event!r} is not an Event subclass")
    if not (isinstance(from_version, int) and 1 <= from_version < event.event_version):
        raise ConfigurationError(
            f"upcaster for {event.__name__}: from_version must be from 1 to "
            f"{event.event_version - 1} (the type is at version {event.event_version})"
        )

    def register(fn: U) -> U:
        if from_version in event.event_upcasters:
            raise ConfigurationError(
                f"{event.__name__} already has an upcaster from version {from_version}"
            )
        event.event_upcasters[from_version] = fn
        return fn

    return register


def _non_finite(value: Any, path: str) -> str | None:
    """The path of the first NaN or infinite float in ``value``, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, BaseModel):
        value = value.__dict__
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


# Events the runtime itself publishes. Services react to them like to any other event.

#: How deep failure announcements may nest: a handler of an announcement that gives up announces
#: its own failure (depth + 1) only up to this depth; beyond it the event is dead-lettered
#: without announcing, so a failing handler of failures cannot announce about itself forever.
MAX_ANNOUNCEMENT_DEPTH = 3


class HandlerFailed(Event):
    """A handler gave up on an event (attempts exhausted or a permanent failure).

    Published with the failed event's correlation id, so compensations can react to it.
    ``data`` is the failed event's data (only its short top-level fields, or nothing, when the
    whole would not fit); an id longer than 256 characters may be replaced by its digest.
    ``depth`` is 1 for a failure on an ordinary event, and n + 1 for a failure while handling
    an announcement of depth n; past :data:`MAX_ANNOUNCEMENT_DEPTH` nothing more is announced.
    """

    event_type: ClassVar[str] = "choreograph.HandlerFailed"
    service: str
    handler: str
    failed_event_type: str
    failed_event_id: str
    reason: str
    error_type: str
    attempts: int
    data: dict[str, Any] = {}
    depth: int = 1


class DeadlineExpired(Event):
    """An awaited event did not arrive in time: what a deadline's function receives (see
    :meth:`Service.deadline`). It is not published; the function returns what to emit."""

    event_type: ClassVar[str] = "choreograph.DeadlineExpired"
    service: str
    name: str
    key: str
    expected: list[str]
    data: dict[str, Any] = {}


class JoinTimedOut(Event):
    """A join's deadline passed before all of its parts arrived."""

    event_type: ClassVar[str] = "choreograph.JoinTimedOut"
    service: str
    join: str
    key: str
    present: list[str]
    missing: list[str]
    parts: dict[str, dict[str, Any]] = {}


class CompensationFailed(Event):
    """A compensating action finally failed; it has been dead-lettered and needs a person."""

    event_type: ClassVar[str] = "choreograph.CompensationFailed"
    service: str
    compensation: str
    failed_event_type: str
    failed_event_id: str
    reason: str
    error_type: str
    attempts: int
    depth: int = 1
    """As :attr:`HandlerFailed.depth`."""


BUILTIN_EVENTS: tuple[type[Event], ...] = (
    HandlerFailed,
    DeadlineExpired,
    JoinTimedOut,
    CompensationFailed,
)
