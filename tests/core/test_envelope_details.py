"""The envelope's details, one by one: every optional attribute both ways, the exact limits and
the exact words of each refusal (the mutation run of docs/testing.md found these unchecked)."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

import orjson
import pytest

from choreograph import envelope as envelope_module
from choreograph.envelope import (
    MAX_ID_CHARS,
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
        # each string attribute of another type
        {"correlationid": 5},
        {"source": 5},
        {"time": 5},
        {"subject": 5},
        {"tracestate": 5},
        {"dataschema": 5},
        # a raw DEL or C1 control character (JSON does not escape them)
        {"subject": "a\u007fb"},
        {"subject": "a\u0085b"},
    ],
)
def test_the_fast_path_for_a_known_type_refuses_what_the_full_path_refuses(
    attributes: dict[str, object],
) -> None:
    good = {"time": "2026-01-01T00:00:00Z", "correlationid": "c1", "data": {}}
    assert decode(raw(**good)).type == "T"  # "T" is now a known, checked type
    with pytest.raises(MalformedEnvelope):
        decode(raw(**{**good, **attributes}))


def test_a_type_that_is_no_event_type_is_refused_whatever_the_rest_of_the_event() -> None:
    good = {"time": "2026-01-01T00:00:00Z", "correlationid": "c1", "data": {}}
    with pytest.raises(MalformedEnvelope, match=r"^invalid event type 'no spaces'"):
        decode(raw(type="no spaces", **good))


def test_the_fast_path_reads_what_the_full_path_reads() -> None:
    envelope = make(causationid="c0", traceparent="00-ab-cd-01", subject="s")
    assert decode(encode(envelope)) == envelope
    assert decode(encode(envelope)) == envelope  # the second time by the fast path
    external = raw(time="2026-01-01T00:00:00Z", ext="kept")
    assert decode(external).extensions == {"ext": "kept"}
    assert decode(external).correlationid == "e1"


def unseen_type() -> str:
    """An event type no decode has met yet: its first decode takes the full path, which checks
    each attribute (a type met before takes the fast path)."""
    return f"T{uuid.uuid4().hex}"


def test_the_full_path_reads_every_attribute() -> None:
    envelope = make(
        type=unseen_type(), subject="s", causationid="c0", traceparent="00-ab-cd-01",
        tracestate="k=v", dataschema="urn:x", extensions={"ext": 1},
    )  # fmt: skip
    assert decode(encode(envelope)) == envelope  # the full path, then
    assert decode(encode(envelope)) == envelope  # the fast path


def test_new_envelope_carries_its_dataschema_and_extensions() -> None:
    envelope = new_envelope(
        "Thing", {}, source="cli", dataschema="urn:choreograph:Thing:v2",
        extensions={"partitionkey": "k"},
    )  # fmt: skip
    assert envelope.dataschema == "urn:choreograph:Thing:v2"
    assert envelope.extensions == {"partitionkey": "k"}
    assert decode(encode(envelope)) == envelope


@pytest.mark.parametrize("character", ["\x7f", "\x85", "\x9f"])
@pytest.mark.parametrize("name", ["subject", "correlationid", "tracestate"])
def test_a_raw_delete_or_c1_control_character_is_refused(character: str, name: str) -> None:
    # JSON writes DEL and C1 controls unescaped: the body holds them raw, and no backslash
    body = raw(type=unseen_type(), **{name: f"a{character}b"})
    assert b"\\" not in body
    with pytest.raises(MalformedEnvelope, match=f"^attribute '{name}' contains a control"):
        decode(body)


@pytest.mark.parametrize("name", ["id", "correlationid", "causationid"])
def test_an_id_of_512_characters_is_accepted_and_one_longer_refused(name: str) -> None:
    longest = "i" * MAX_ID_CHARS
    assert getattr(decode(raw(type=unseen_type(), **{name: longest})), name) == longest
    with pytest.raises(
        MalformedEnvelope, match=f"^attribute '{name}' is 513 characters; at most 512$"
    ):
        decode(raw(type=unseen_type(), **{name: longest + "i"}))


def test_a_refused_content_type_is_quoted_up_to_200_characters() -> None:
    content_type = "text/" + "x" * 300
    with pytest.raises(MalformedEnvelope) as refused:
        decode(raw(datacontenttype=content_type))
    assert str(refused.value) == f"unsupported datacontenttype {content_type[:200]!r}"


def test_the_types_met_are_remembered_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # given an empty memory of checked types, bounded to 3 (10,000 in use)
    met: set[str] = set()
    monkeypatch.setattr(envelope_module, "_GOOD_TYPES", met)
    monkeypatch.setattr(envelope_module, "_GOOD_TYPES_MAX", 3)
    # when five types are decoded, then the first three are remembered, and no more
    for name in ("A", "B", "C", "D", "E"):
        assert decode(raw(type=name)).type == name
    assert met == {"A", "B", "C"}


def test_data_json_cannot_hold_is_refused_naming_the_event() -> None:
    with pytest.raises(MalformedEnvelope, match=r"^event Thing cannot be encoded: \w"):
        encode(make(data={"x": object()}))
