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

Payloads are validated when received; unknown fields are ignored so that producers may add fields
without breaking older consumers. Numbers must be finite: NaN and Infinity have no JSON form (they
would travel as ``null`` and fail every consumer), so an event holding one, at any depth, is
refused when it is made. A class that wants them anyway sets
``model_config = ConfigDict(allow_inf_nan=True)`` (and gets ``null`` on the wire).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from choreograph.envelope import check_event_type
from choreograph.errors import SchemaViolation


class Event(BaseModel):
    """Base class of every event type."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    event_type: ClassVar[str]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if "event_type" not in cls.__dict__:
            cls.event_type = cls.__name__
        check_event_type(cls.event_type)

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
