import orjson
import pytest
from cloudevents.core.formats.json import JSONFormat

from choreograph.envelope import MAX_EVENT_BYTES, Envelope, decode, encode
from choreograph.errors import MalformedEnvelope, PayloadTooLarge


def make(**changes: object) -> Envelope:
    base = Envelope(id="e1", type="Thing", source="svc", correlationid="c1", data={"x": 1})
    return base.evolve(**changes)


def test_round_trip_keeps_every_attribute_and_extension() -> None:
    envelope = make(causationid="e0", traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01",
                    subject="s", extensions={"partitionkey": "k"})  # fmt: skip
    assert decode(encode(envelope)) == envelope


def test_the_official_cloudevents_sdk_reads_it() -> None:
    event = JSONFormat().read(None, encode(make(causationid="e0")))
    attributes = event.get_attributes()
    assert attributes["id"] == "e1"
    assert attributes["type"] == "Thing"
    assert attributes["correlationid"] == "c1"
    assert attributes["causationid"] == "e0"
    assert event.get_data() == {"x": 1}


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"id": "1", "type": "T", "source": "s"}', "specversion"),
        (b'{"specversion": "0.3", "id": "1", "type": "T", "source": "s"}', "unsupported"),
        (b'{"specversion": "1.0", "id": "", "type": "T", "source": "s"}', "id"),
        (b'{"specversion": "1.0", "id": "1", "type": "T", "source": "s", "data": 5}', "'data'"),
        (b'{"specversion": "1.0", "id": "1", "type": "no spaces", "source": "s"}', "event type"),
        (
            b'{"specversion": "1.0", "id": "1", "type": "T", "source": "s", '
            b'"datacontenttype": "text/xml"}',
            "datacontenttype",
        ),
        (
            b'{"specversion": "1.0", "id": "1", "type": "T", "source": "s", "causationid": 3}',
            "causationid",
        ),
    ],
)
def test_malformed_envelopes_say_what_is_wrong(body: bytes, says: str) -> None:
    with pytest.raises(MalformedEnvelope, match=says):
        decode(body)


def test_a_foreign_event_without_correlation_starts_its_own_transaction() -> None:
    body = orjson.dumps({"specversion": "1.0", "id": "x9", "type": "T", "source": "other"})
    assert decode(body).correlationid == "x9"


def test_size_limit_on_both_sides() -> None:
    big = make(data={"blob": "x" * MAX_EVENT_BYTES})
    with pytest.raises(PayloadTooLarge):
        encode(big)
    with pytest.raises(PayloadTooLarge):
        decode(b" " * (MAX_EVENT_BYTES + 1))
