"""What this transport puts on the wire: its header names, and the frames it marshals itself.

publish() writes whole windows of messages as one buffer and registers their confirmations
itself: the client's one-call-per-message path costs ~100 µs of CPU per message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pamqp import commands as spec
from pamqp.header import ContentHeader

from choreograph.errors import ConfigurationError

ATTEMPT = "x-choreograph-attempt"
"""Header set on every copy this transport re-publishes (retry, give-back): its attempt number.
The quorum queue adds ``x-delivery-count`` (returns since it was enqueued) on top of it."""
KIND, DL_ID, GROUP = "x-choreograph-kind", "x-choreograph-dead-letter", "x-choreograph-group"
REASON, ERROR_TYPE, ERROR = (
    "x-choreograph-reason",
    "x-choreograph-error-type",
    "x-choreograph-error",
)
ATTEMPTS, FAILED_AT = "x-choreograph-attempts", "x-choreograph-failed-at-ms"
TRACEBACK = "x-choreograph-traceback"
REFUSED = "oversized"
"""``KIND`` of a reference published in place of an oversized message: the member that receives
it dead-letters it at once (the broker, not the transport, knows which groups it was for)."""
DLQ_KEY = "~dlq"  # routes to the dead-letter stream through ns.groups: no group name has a '~'

_FRAME_END = b"\xce"
_PUBLISH = struct.pack(">HHH", 60, 40, 0)  # basic.publish, reserved-1
_FLAGS = (1 << 12) | (1 << 7) | (1 << 5)  # property flags: delivery-mode, message-id, type
_HEADERS_FLAG = 1 << 13
_ATTEMPT_KEY = bytes((len(ATTEMPT),)) + ATTEMPT.encode() + b"I"


def _shortstr(value: str, what: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ConfigurationError(f"{what} {value[:40]!r}… is over 255 bytes, the AMQP limit")
    return bytes((len(raw),)) + raw


def content_header(message_id: str, topic: str, size: int, attempt: int = 1) -> bytes:
    """Content-header payload: persistent, message-id, type (and the attempt header if > 1)."""
    ids = b"\x02" + _shortstr(message_id, "event id") + _shortstr(topic, "topic")
    if attempt == 1:
        return struct.pack(">HHQH", 60, 0, size, _FLAGS) + ids
    table = _ATTEMPT_KEY + struct.pack(">i", attempt)
    return struct.pack(">HHQHI", 60, 0, size, _FLAGS | _HEADERS_FLAG, len(table)) + table + ids


def rich_header(properties: spec.Basic.Properties, size: int) -> bytes:
    return ContentHeader(0, size, properties).marshal()


@dataclass(slots=True)
class Out:
    """One message ready to go: where to, and its marshalled content header."""

    exchange: str
    routing_key: str
    header: bytes
    body: bytes
    message_id: str

    def frames(self, channel: int, max_body: int, mandatory: bool) -> bytes:
        method = (
            _PUBLISH
            + _shortstr(self.exchange, "exchange")
            + _shortstr(self.routing_key, "routing key")
            + (b"\x01" if mandatory else b"\x00")
        )
        parts = [
            struct.pack(">BHI", 1, channel, len(method)), method, _FRAME_END,
            struct.pack(">BHI", 2, channel, len(self.header)), self.header, _FRAME_END,
        ]  # fmt: skip
        body = self.body
        for start in range(0, len(body), max_body):
            chunk = body[start : start + max_body]
            parts += (struct.pack(">BHI", 3, channel, len(chunk)), chunk, _FRAME_END)
        return b"".join(parts)


def header_budget(frame_max: int) -> int:
    """Bytes of failure text a dead letter's headers may carry: its content header must fit in
    one frame, with room for the ids, topic, group, reason and numbers beside the text."""
    return max(0, min(16_384, frame_max - 8 - 4096))


def int_value(value: object, default: int) -> int:
    return value if type(value) is int else default


def str_value(value: object) -> str:
    return value if isinstance(value, str) else ""
