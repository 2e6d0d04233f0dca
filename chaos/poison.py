"""Malformed messages, published beside the valid traffic as a foreign producer would.

Each kind is one message on a topic the drone services consume; none is a valid delivery request.
Whatever it holds, the services must dead-letter it with a reason and keep handling everything
else; a poison message that stalls a consumer shows up in the run as a stall.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import orjson

from choreograph.envelope import MAX_EVENT_BYTES
from choreograph.errors import PayloadTooLarge
from choreograph.transport import Message, Transport

TOPIC = "DeliveryRequested"
"""Every poison message goes where package, drone-scheduler and delivery all listen."""


def _event(event_id: str, data: Any, *, event_type: str = TOPIC, **extra: Any) -> bytes:
    doc = {"specversion": "1.0", "id": event_id, "source": "chaos/foreign", "type": event_type,
           "datacontenttype": "application/json", "data": data, **extra}  # fmt: skip
    return orjson.dumps(doc)


def _nested(event_id: str, depth: int) -> bytes:
    """An event whose data nests ``depth`` objects deep (written by hand: JSON encoders refuse
    depths like this, decoders may not)."""
    body = _event(event_id, {"delivery_id": "deep", "pickup": "@nest@"})
    return body.replace(b'"@nest@"', b'{"d":' * depth + b'"bottom"' + b"}" * depth)


def _request(delivery_id: str) -> dict[str, Any]:
    return {
        "delivery_id": delivery_id,
        "owner_id": "chaos",
        "pickup": {"latitude": 47.6, "longitude": -122.3},
        "dropoff": {"latitude": 47.7, "longitude": -122.2},
        "package": {"package_id": "p-" + delivery_id[:60], "size": "small", "weight_kg": 1.0},
    }


HOSTILE = "d-\x00\u202e\U0001f4a5'; DROP TABLE x;--\ud7ff" + "\ufffd" * 50 + "x" * 300
"""NUL, a right-to-left override, an emoji, SQL, replacement characters, and length."""


@dataclass(frozen=True)
class Poison:
    kind: str
    make: Callable[[str], bytes]
    """Builds the body from a fresh event id."""
    oversized: bool = False
    """Over the transport's limit: dead-lettered by reference at publish."""


CATALOGUE: tuple[Poison, ...] = (
    Poison("bad JSON", lambda i: b'{"specversion": "1.0", "id": "' + i.encode() + b'", "type": '),
    Poison("not an object", lambda i: b"[1, 2, 3]"),
    Poison("unknown type", lambda i: _event(i, {"x": 1}, event_type="NoSuchEvent")),
    Poison("wrong schema", lambda i: _event(i, {"delivery_id": 5, "owner_id": None})),
    Poison("missing data", lambda i: _event(i, None, correlationid=f"c-{i}")),
    Poison("hostile strings", lambda i: _event(i, _request(HOSTILE), correlationid=HOSTILE)),
    Poison("NUL in the event id", lambda i: _event(i + "\x00nul", {"delivery_id": "\x00"})),
    Poison("deep nesting", lambda i: _nested(i, 300)),
    Poison(
        "long id, no correlation",
        lambda i: _event(i + "z" * 20_000, {"delivery_id": "?"}),
    ),
    Poison(
        "near the limit",
        lambda i: _event(i, {"delivery_id": "big", "pad": "p" * (MAX_EVENT_BYTES - 2048)}),
    ),
    Poison(
        "oversized", lambda i: _event(i, {"pad": "p" * (MAX_EVENT_BYTES + 1024)}), oversized=True
    ),
)


@dataclass
class Published:
    event_id: str
    kind: str
    refused: str = ""
    """Why the transport refused it at publish (a clear error: nothing to dead-letter then)."""


async def publish_poison(
    transport: Transport, round_number: int, skip: Collection[str] = ()
) -> list[Published]:
    """Publish one message of every kind but those named in ``skip``, one at a time (a transport
    may refuse one with :class:`PayloadTooLarge`, which is a clear answer too); returns what was
    sent or refused."""
    sent: list[Published] = []
    for poison in CATALOGUE:
        if poison.kind in skip:
            continue
        event_id = f"poison-{round_number}-{uuid.uuid4().hex[:12]}"
        try:
            await transport.publish([Message(event_id, TOPIC, poison.make(event_id))])
        except PayloadTooLarge as exc:
            sent.append(Published(event_id, poison.kind, refused=str(exc)))
        else:
            sent.append(Published(event_id, poison.kind))
    return sent
