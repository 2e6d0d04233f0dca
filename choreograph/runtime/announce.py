"""Failure announcements (``HandlerFailed``, ``CompensationFailed``), built from whatever the
failed event holds and always bounded.

An announcement is tried in three forms, most complete first, and the first that can be encoded
within the transport's limit is staged: with the failed event's whole ``data``; with only its
short top-level fields; with no data, ids longer than :data:`LONGEST_ID` replaced by a digest and
no trace state. The last form is small whatever the failed event held.

Announcements nest: a handler of an announcement that gives up announces its own failure, one
level deeper (``depth``). Past :data:`~choreograph.events.MAX_ANNOUNCEMENT_DEPTH` nothing is
announced and the event is only dead-lettered, so failures cannot announce about themselves
forever.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from choreograph.context import Context
from choreograph.envelope import Envelope
from choreograph.events import CompensationFailed, Event, HandlerFailed
from choreograph.transport import Failure

#: Ids longer than this are announced by digest in the bounded form.
LONGEST_ID = 256
_ANNOUNCEMENTS = frozenset((HandlerFailed.event_type, CompensationFailed.event_type))
_FAILED_IDS = uuid.UUID("6f1c2a56-0d7e-4c36-9a53-2f7f0a4f8b11")

Build = Callable[[], tuple[Event, Callable[[Envelope], Envelope]]]


def depth(failed: Envelope) -> int:
    """The depth of an announcement about a failure to handle ``failed``."""
    if failed.type not in _ANNOUNCEMENTS:
        return 1
    found = failed.data.get("depth", 1)
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        found = 1  # a foreign announcement without a usable depth is one level deep
    return found + 1


def announcement_id(service: str, name: str, event_id: str) -> str:
    """The same failure announced twice (a crash before the dead letter) has one id."""
    return str(uuid.uuid5(_FAILED_IDS, f"{service}/{name}/{event_id}"))


def forms(
    ctx: Context, *, name: str, failure: Failure, compensation: bool, level: int
) -> Iterator[Build]:
    """Builders of the announcement, most complete first. Each returns the event and how to
    adjust its envelope; building may raise (the failed event's data is anything)."""

    def event(data: dict[str, Any] | None, *, bounded: bool) -> Event:
        event_id = digest(ctx.event_id) if bounded else ctx.event_id
        reason = (failure.error or failure.reason)[: 500 if bounded else 2000]
        if compensation:
            return CompensationFailed(
                service=ctx.service,
                compensation=name,
                failed_event_type=ctx.envelope.type,
                failed_event_id=event_id,
                reason=reason,
                error_type=failure.error_type,
                attempts=ctx.attempt,
                depth=level,
            )
        return HandlerFailed(
            service=ctx.service,
            handler=name,
            failed_event_type=ctx.envelope.type,
            failed_event_id=event_id,
            reason=reason,
            error_type=failure.error_type,
            attempts=ctx.attempt,
            data=data or {},
            depth=level,
        )

    def as_is(envelope: Envelope) -> Envelope:
        return envelope

    def bounded(envelope: Envelope) -> Envelope:
        return envelope.evolve(
            correlationid=digest(envelope.correlationid),
            causationid=None if envelope.causationid is None else digest(envelope.causationid),
            tracestate=None,
        )

    yield lambda: (event(ctx.envelope.data, bounded=False), as_is)
    if not compensation:  # a CompensationFailed carries no data: its one form is bounded enough
        yield lambda: (event(_short_fields(ctx.envelope.data), bounded=False), as_is)
    yield lambda: (event(None, bounded=True), bounded)


def digest(value: str) -> str:
    """``value``, or for one longer than :data:`LONGEST_ID` its head and SHA-256 digest."""
    if len(value) <= LONGEST_ID:
        return value
    return f"{value[:64]}...sha256:{hashlib.sha256(value.encode('utf-8', 'replace')).hexdigest()}"


def _short_fields(data: dict[str, Any], longest: int = 200) -> dict[str, Any]:
    return {
        k: v
        for k, v in data.items()
        if len(k) <= longest
        and (isinstance(v, int | float | bool) or (isinstance(v, str) and len(v) <= longest))
    }
