"""The envelope's details, one by one: every optional attribute both ways, the exact limits and
the exact words of each refusal (the mutation run of docs/testing.md found these unchecked)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import orjson
import pytest

from choreograph.envelope import (
    Envelope,
    check_event_type,
    decode,
    encode,
    new_envelope,
    utc_now_iso,
)
from choreograph.errors import MalformedEnvelope, PayloadTooLarge

OPTIONAL = ("subject", "causationid", "traceparent", "tracestate")


def make(**changes: object) -> Envelope:
    base = Envelope(id="e1", type="Thing", source="svc", correlationid="c1", data={"x": 1})
    return base.evolve(**changes)


def raw(**attributes: object) -> bytes:
    return orjson.dumps(
        {"specversion": "1.0", "id": "e1", "type": "T", "source": "s", **attributes}
    )


def test_time_is_utc_with_microseconds_and_a_z() -> None:
    stamp = utc_now_iso()

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 3600


@pytest.mark.parametrize("name", OPTIONAL)
def test_each_optional_attribute_is_written_and_read_back(name: str) -> None:
    # given an envelope with only this optional attribute set
    envelope = make(**{name: f"value of {name}"})

    # when encoded and decoded
    doc = orjson.loads(encode(envelope))
    back = decode(encode(envelope))

    # then the wire carries it under its CloudEvents name, and it comes back
    assert doc[name] == f"value of {name}"
    assert getattr(back, name) == f"value of {name}"
    assert back == envelope
    assert set(OPTIONAL) - {name} <= set(OPTIONAL) - set(doc)


def test_unset_optional_attributes_are_left_off_the_wire() -> None:
    doc = orjson.loads(encode(make()))

    assert not set(OPTIONAL) & set(doc)
    assert doc["datacontenttype"] == "application/json"
    assert doc["specversion"] == "1.0"


def test_new_envelope_starts_a_transaction_named_after_itself_unless_told() -> None:
    started = new_envelope("Thing", {"x": 1}, source="cli")
    joined = new_envelope("Thing", {}, source="cli", correlation_id="order-7")

    assert started.correlationid == started.id
    assert (started.type, started.source, started.data) == ("Thing", "cli", {"x": 1})
    assert joined.correlationid == "order-7" != joined.id


@pytest.mark.parametrize("body", [raw(), raw(data=None)])
def test_missing_or_null_data_reads_as_an_empty_object(body: bytes) -> None:
    assert decode(body).data == {}


def test_a_body_exactly_at_the_limit_is_accepted_both_ways() -> None:
    envelope = make()
    size = len(encode(envelope))

    assert decode(encode(envelope, limit=size), limit=size) == envelope
    with pytest.raises(
        PayloadTooLarge, match=f"event Thing is {size} bytes; the limit is {size - 1}"
    ):
        encode(envelope, limit=size - 1)
    with pytest.raises(PayloadTooLarge, match=f"message is {size} bytes; the limit is {size - 1}"):
        decode(encode(envelope), limit=size - 1)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"text"', "expected a JSON object, got str"),
        (
            b'{"specversion": "1.0", "type": "T"}',
            "missing or empty CloudEvents attribute(s): id, source",
        ),
        (raw(data=[1]), "'data' must be a JSON object, got list"),
        (raw(data="x"), "'data' must be a JSON object, got str"),
        (raw(specversion="0.3"), "unsupported specversion '0.3'"),
        (raw(datacontenttype="text/xml"), "unsupported datacontenttype 'text/xml'"),
    ],
)
def test_each_refusal_says_exactly_what_is_wrong(body: bytes, message: str) -> None:
    with pytest.raises(MalformedEnvelope, match=f"^{re.escape(message)}$"):
        decode(body)


@pytest.mark.parametrize(
    "name", ["time", "subject", "correlationid", "causationid", "traceparent", "tracestate"]
)
@pytest.mark.parametrize("value", [3, ["x"], {"a": 1}, True])
def test_a_string_attribute_of_another_type_is_refused(name: str, value: object) -> None:
    with pytest.raises(MalformedEnvelope, match=f"^attribute '{name}' must be a string$"):
        decode(raw(**{name: value}))


def test_an_invalid_event_type_is_refused_with_the_rule() -> None:
    rule = (
        "invalid event type 'no spaces': use letters, digits, '.', '_' or '-', "
        "starting with a letter, at most 200 characters"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(rule)}$"):
        check_event_type("no spaces")
    with pytest.raises(MalformedEnvelope, match=f"^{re.escape(rule)}$"):
        decode(raw(type="no spaces"))
    assert check_event_type("a" * 200) == "a" * 200
    with pytest.raises(ValueError):
        check_event_type("a" * 201)


@pytest.mark.parametrize(
    "attributes",
    [
        {"type": ["T"]},
        {"type": {"T": 1}},
        {"id": ""},
        {"id": 7},
        {"correlationid": "c" * 513},
        {"causationid": 5},
        {"traceparent": ["x"]},
        {"data": [1]},
        {"specversion": "0.3"},
        {"datacontenttype": "text/xml"},
        {"correlationid": "a\u0001b"},
    ],
)
def test_the_fast_path_for_a_known_type_refuses_what_the_full_path_refuses(
    attributes: dict[str, object],
) -> None:
    good = {"time": "2026-01-01T00:00:00Z", "correlationid": "c1", "data": {}}
    assert decode(raw(**good)).type == "T"  # "T" is now a known, checked type
    with pytest.raises(MalformedEnvelope):
        decode(raw(**{**good, **attributes}))


def test_the_fast_path_reads_what_the_full_path_reads() -> None:
    envelope = make(causationid="c0", traceparent="00-ab-cd-01", subject="s")
    assert decode(encode(envelope)) == envelope
    assert decode(encode(envelope)) == envelope  # the second time by the fast path
    external = raw(time="2026-01-01T00:00:00Z", ext="kept")
    assert decode(external).extensions == {"ext": "kept"}
    assert decode(external).correlationid == "e1"
