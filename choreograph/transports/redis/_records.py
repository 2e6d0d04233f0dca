"""The binary message record and the framed replies of the scripts (format: ``_lua.py``)."""

from __future__ import annotations

import struct

from choreograph.transport import Delivery, Message

_FRAME = struct.Struct(">II")
RECORD = struct.Struct(">IIII")
HASH = struct.Struct(">I")
"""The hash of a message's partition key, sent beside its record when it is published."""


def decode_frames(buf: bytes) -> list[Delivery]:
    """Parse the framed entries a script returned."""
    deliveries: list[Delivery] = []
    append = deliveries.append
    frame = _FRAME.unpack_from
    header = RECORD.unpack_from
    pos, end = 0, len(buf)
    while pos < end:
        le, attempt = frame(buf, pos)
        a = pos + 8
        b = a + le
        li, lt, lb, lg = header(buf, b)
        c = b + 16
        d = c + li
        e = d + lt
        f = e + lb
        pos = f + lg
        target = buf[f:pos].decode() if lg else None
        append(
            Delivery(
                Message(buf[c:d].decode(), buf[d:e].decode(), buf[e:f], target), attempt, buf[a:b]
            )
        )
    return deliveries


def _decode_record(record: bytes) -> Message:
    li, lt, lb, lg = RECORD.unpack_from(record)
    c = 16
    d = c + li
    e = d + lt
    f = e + lb
    target = record[f : f + lg].decode() if lg else None
    return Message(record[c:d].decode(), record[d:e].decode(), record[e:f], target)


def decode_entry(eid: bytes, entry: dict[bytes, bytes]) -> Delivery:
    """One entry as redis-py parses an XREADGROUP reply (a first delivery: attempt as stored)."""
    return Delivery(_decode_record(entry.get(b"m", b"\0" * 16)), int(entry.get(b"a", b"1")), eid)


def stream_id_key(eid: str) -> tuple[int, int]:
    ms, _, seq = eid.partition("-")
    return int(ms), int(seq)
