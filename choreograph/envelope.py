"""The message on the wire: a CloudEvents 1.0 structured-mode JSON event.

Every event choreograph publishes is one JSON object with the CloudEvents attributes
``specversion``, ``id``, ``source``, ``type``, ``time``, ``datacontenttype``, optional
``subject``, the event's ``data`` object, and the extensions ``correlationid`` (the business
transaction), ``causationid`` (the id of the event that caused this one), ``traceparent`` and
``tracestate`` (W3C trace context), and ``dataschema``, which names the event type's version
(:func:`schema_uri`). Unknown extension attributes are kept as they are. The CloudEvents
Partitioning extension ``partitionkey`` names the key a key-partitioned group orders the event
by; without it, the key is the ``correlationid`` (:func:`partition_key`).
See ``docs/wire-format.md``.
"""

from __future__ import annotations

import re
import uuid
import zlib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from choreograph.errors import MalformedEnvelope, PayloadTooLarge

SPECVERSION = "1.0"
CONTENT_TYPE = "application/json"
#: The largest encoded event accepted, published or received (bytes). NATS' default limit is 1 MiB.
MAX_EVENT_BYTES = 512 * 1024
#: The longest ``id``, ``correlationid`` or ``causationid`` accepted on receipt (characters): ids
#: are keys of every store's inbox and joins, and must stay well inside an index entry.
MAX_ID_CHARS = 512

_EVENT_TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,199}$")
# CloudEvents attribute strings must not hold control characters (and no store can key a NUL).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ATTRIBUTES = ("id", "source", "time", "subject", "correlationid", "causationid", "traceparent",
               "tracestate", "dataschema")  # fmt: skip
_IDS = ("id", "correlationid", "causationid")
_REQUIRED = ("id", "source", "type", "specversion")
_KNOWN = frozenset(
    (*_REQUIRED, "time", "datacontenttype", "subject", "data", "correlationid", "causationid",
     "traceparent", "tracestate", "dataschema")
)  # fmt: skip

# Event types already checked (and so known well-formed); bounded, as senders choose them.
_GOOD_TYPES: set[str] = set()
_GOOD_TYPES_MAX = 10_000


#: ``dataschema`` of an event choreograph publishes: ``urn:choreograph:<type>:v<version>``.
SCHEMA_PREFIX = "urn:choreograph:"


def schema_uri(event_type: str, version: int) -> str:
    """The ``dataschema`` naming version ``version`` of ``event_type``'s data."""
    return f"{SCHEMA_PREFIX}{event_type}:v{version}"


def schema_version(envelope: Envelope) -> int:
    """The version of ``envelope``'s data: the one its ``dataschema`` names, 1 without one.

    Raises :class:`MalformedEnvelope` for a ``dataschema`` not of the form :func:`schema_uri`
    writes, or naming another type: guessing the shape of data would be worse than a dead letter.
    """
    uri = envelope.dataschema
    if uri is None:
        return 1
    named, _, version = uri.removeprefix(SCHEMA_PREFIX).rpartition(":v")
    if not uri.startswith(SCHEMA_PREFIX) or not version.isdigit() or not version.isascii():
        raise MalformedEnvelope(
            f"dataschema {uri[:200]!r} is not of the form "
            f"'{SCHEMA_PREFIX}{envelope.type}:v<version>'"
        )
    if named != envelope.type:
        raise MalformedEnvelope(f"dataschema {uri[:200]!r} names another type than {envelope.type}")
    if not 0 < int(version) < 1_000_000:
        raise MalformedEnvelope(f"dataschema {uri[:200]!r}: versions start at 1")
    return int(version)


def media_type_is_json(content_type: str) -> bool:
    """Whether ``content_type`` is ``application/json``, with parameters or not (``charset``, when
    given, must be UTF-8: JSON on the wire is UTF-8)."""
    main, _, parameters = content_type.partition(";")
    if main.strip().lower() != CONTENT_TYPE:
        return False
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return False
    return True


def new_id() -> str:
    """A fresh, globally unique event id."""
    return str(uuid.uuid4())


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def check_event_type(name: str) -> str:
    """Return ``name`` if it is usable as an event type (and so as a broker subject), else raise."""
    if not _EVENT_TYPE.match(name):
        raise ValueError(
            f"invalid event type {name!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter, at most 200 characters"
        )
    return name


@dataclass(frozen=True, slots=True)
class Envelope:
    """One event as it travels on the bus. Immutable; use :meth:`evolve` to derive a copy."""

    id: str
    type: str
    source: str
    correlationid: str
    data: dict[str, Any]
    time: str = field(default_factory=utc_now_iso)
    subject: str | None = None
    causationid: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    dataschema: str | None = None
    extensions: dict[str, Any] = field(default_factory=dict)

    def evolve(self, **changes: Any) -> Envelope:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "specversion": SPECVERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": self.time,
            "datacontenttype": CONTENT_TYPE,
            "correlationid": self.correlationid,
        }
        if self.subject is not None:
            doc["subject"] = self.subject
        if self.causationid is not None:
            doc["causationid"] = self.causationid
        if self.traceparent is not None:
            doc["traceparent"] = self.traceparent
        if self.tracestate is not None:
            doc["tracestate"] = self.tracestate
        if self.dataschema is not None:
            doc["dataschema"] = self.dataschema
        doc.update(self.extensions)
        doc["data"] = self.data
        return doc


def new_envelope(
    event_type: str,
    data: dict[str, Any],
    *,
    source: str,
    correlation_id: str = "",
    dataschema: str | None = None,
    extensions: dict[str, Any] | None = None,
) -> Envelope:
    """An event published from outside any handling: it starts the transaction
    ``correlation_id``, or a new one named after its own id."""
    event_id = new_id()
    return Envelope(
        id=event_id,
        type=event_type,
        source=source,
        correlationid=correlation_id or event_id,
        data=data,
        dataschema=dataschema,
        extensions=extensions or {},
    )


def encode(envelope: Envelope, *, limit: int = MAX_EVENT_BYTES) -> bytes:
    """Encode as CloudEvents structured JSON. Raises :class:`PayloadTooLarge` over ``limit``, and
    :class:`MalformedEnvelope` for what JSON cannot hold (nesting deeper than 254 levels, text
    that is not valid Unicode, values that are not JSON types)."""
    try:
        body = orjson.dumps(envelope.to_dict())
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise MalformedEnvelope(f"event {envelope.type} cannot be encoded: {exc}") from None
    if len(body) > limit:
        raise PayloadTooLarge(f"event {envelope.type} is {len(body)} bytes; the limit is {limit}")
    return body


_PARTITION_KEY = b'"partitionkey"'
_CORRELATION_ID = b'"correlationid":"'


def partition_key(body: bytes) -> str | None:
    """The key a key-partitioned group orders this encoded event by: its ``partitionkey``
    extension (CloudEvents Partitioning) when it has one, else its ``correlationid``; None for a
    body that is not a JSON object with either. Cheap for the usual event, which has no
    ``partitionkey``: its correlation id is read where it stands when no ``{`` precedes it (so it
    is an attribute of the event, not a field of a nested object) and it is there once (JSON
    keeps the last of two); any other body is parsed."""
    if _PARTITION_KEY not in body and body[:1] == b"{":
        at = body.find(_CORRELATION_ID)
        if at > 0 and body.find(b"{", 1, at) < 0:
            start = at + len(_CORRELATION_ID)
            stop = body.find(b'"', start)
            value = body[start:stop]
            if stop > start and b"\\" not in value and body.find(_CORRELATION_ID, stop) < 0:
                return value.decode("utf-8", "replace")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(doc) is not dict:
        return None
    key = doc.get("partitionkey") or doc.get("correlationid")
    return key if type(key) is str and key else None


def partition_hash(body: bytes, fallback: str) -> int:
    """The hash that places an encoded event in a key-partitioned group's partition (the
    partition is this modulo the group's partitions): CRC-32 of its :func:`partition_key`, or of
    ``fallback`` (the event id) for a body without one. Every transport partitions with it, so
    a key lands in the same partition number everywhere."""
    return zlib.crc32((partition_key(body) or fallback).encode())


def decode(body: bytes, *, limit: int = MAX_EVENT_BYTES) -> Envelope:
    """Parse one structured CloudEvent. Raises a :class:`MalformedEnvelope` saying what is wrong."""
    if len(body) > limit:
        raise PayloadTooLarge(f"message is {len(body)} bytes; the limit is {limit}")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedEnvelope(f"not JSON: {exc}") from None
    if type(doc) is not dict:
        raise MalformedEnvelope(f"expected a JSON object, got {type(doc).__name__}")
    # The fast path: an event as choreograph writes it, checked attribute by attribute below
    # as in the full path (which also says what is wrong).
    get = doc.get
    event_id, correlation_id, causation_id = get("id"), get("correlationid"), get("causationid")
    event_type, source, time, data = get("type"), get("source"), get("time"), get("data")
    subject, traceparent, tracestate = get("subject"), get("traceparent"), get("tracestate")
    dataschema = get("dataschema")
    if (
        type(event_type) is str
        and event_type in _GOOD_TYPES
        and type(event_id) is str
        and type(correlation_id) is str
        and type(source) is str
        and type(time) is str
        and type(data) is dict
        and event_id
        and source
        and time
        and len(event_id) <= MAX_ID_CHARS
        and len(correlation_id) <= MAX_ID_CHARS
        and (
            causation_id is None
            or (type(causation_id) is str and len(causation_id) <= MAX_ID_CHARS)
        )
        and (subject is None or type(subject) is str)
        and (traceparent is None or type(traceparent) is str)
        and (tracestate is None or type(tracestate) is str)
        and (dataschema is None or type(dataschema) is str)
        and get("specversion") == SPECVERSION
        and get("datacontenttype", CONTENT_TYPE) == CONTENT_TYPE
        and doc.keys() <= _KNOWN
        and b"\\" not in body
        and b"\x7f" not in body
        and b"\xc2" not in body
    ):
        return Envelope(
            event_id, event_type, source, correlation_id or event_id, data, time, subject,
            causation_id, traceparent, tracestate, dataschema, {},
        )  # fmt: skip
    return _decode_checked(doc, body)


def _decode_checked(doc: dict[str, Any], body: bytes) -> Envelope:
    missing = [name for name in _REQUIRED if not isinstance(doc.get(name), str) or not doc[name]]
    if missing:
        raise MalformedEnvelope(f"missing or empty CloudEvents attribute(s): {', '.join(missing)}")
    if doc["specversion"] != SPECVERSION:
        raise MalformedEnvelope(f"unsupported specversion {doc['specversion']!r}")
    content_type = doc.get("datacontenttype", CONTENT_TYPE)
    if content_type != CONTENT_TYPE and not (
        isinstance(content_type, str) and media_type_is_json(content_type)
    ):
        raise MalformedEnvelope(f"unsupported datacontenttype {str(content_type)[:200]!r}")
    data = doc.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MalformedEnvelope(f"'data' must be a JSON object, got {type(data).__name__}")
    for name in _ATTRIBUTES:
        value = doc.get(name)
        if value is not None and not isinstance(value, str):
            raise MalformedEnvelope(f"attribute {name!r} must be a string")
    # JSON holds a control character only escaped (or DEL and C1 raw): most bodies have none.
    if b"\\" in body or b"\x7f" in body or b"\xc2" in body:
        for name in _ATTRIBUTES:
            value = doc.get(name)
            if value is not None and _CONTROL.search(value):
                raise MalformedEnvelope(f"attribute {name!r} contains a control character")
    for name in _IDS:
        value = doc.get(name)
        if value is not None and len(value) > MAX_ID_CHARS:
            raise MalformedEnvelope(
                f"attribute {name!r} is {len(value)} characters; at most {MAX_ID_CHARS}"
            )
    try:
        check_event_type(doc["type"])
    except ValueError as exc:
        raise MalformedEnvelope(str(exc)) from None
    if len(_GOOD_TYPES) < _GOOD_TYPES_MAX:
        _GOOD_TYPES.add(doc["type"])
    return Envelope(
        id=doc["id"],
        type=doc["type"],
        source=doc["source"],
        # An event from outside choreograph starts its own transaction.
        correlationid=doc.get("correlationid") or doc["id"],
        data=data,
        time=doc.get("time") or utc_now_iso(),
        subject=doc.get("subject"),
        causationid=doc.get("causationid"),
        traceparent=doc.get("traceparent"),
        tracestate=doc.get("tracestate"),
        dataschema=doc.get("dataschema"),
        extensions={k: v for k, v in doc.items() if k not in _KNOWN},
    )
