"""Event versions: declared on the class, written to ``dataschema``, read back through upcasters
(older), tolerantly (newer), or refused with a reason; the wire's tolerance for content types with
parameters and its refusal of an event whose topic and type differ."""

from __future__ import annotations

from typing import Any, ClassVar

import orjson
import pytest

from choreograph import (
    App,
    ConfigurationError,
    Context,
    Event,
    MalformedEnvelope,
    SchemaViolation,
    Service,
    upcaster,
)
from choreograph.envelope import decode, schema_version
from choreograph.testing import Harness
from choreograph.transport import Message


class V1(Event):
    event_type: ClassVar[str] = "Shipment"
    parcel: str


class V3(Event, version=3):
    event_type: ClassVar[str] = "Shipment"
    parcel_id: str
    carrier: str


@upcaster(V3, from_version=1)
def rename_parcel(data: dict[str, Any]) -> dict[str, Any]:
    return {"parcel_id": data.pop("parcel")} | data


@upcaster(V3, from_version=2)
def default_carrier(data: dict[str, Any]) -> dict[str, Any]:
    return {"carrier": "post", **data}


def test_a_version_is_declared_on_the_class_and_named_by_its_dataschema() -> None:
    assert V1.event_version == 1 and V3.event_version == 3
    assert V3.dataschema() == "urn:choreograph:Shipment:v3"

    class Child(V3):  # a subclass declares its own version (1 unless it says)
        pass

    assert Child.event_version == 1 and Child.event_upcasters == {}


def test_older_data_is_upcast_through_every_version_in_turn() -> None:
    assert V3.read({"parcel": "p1"}, 1) == V3(parcel_id="p1", carrier="post")
    assert V3.read({"parcel_id": "p2"}, 2) == V3(parcel_id="p2", carrier="post")
    assert V3.read({"parcel_id": "p3", "carrier": "van"}, 3).carrier == "van"


def test_newer_data_is_read_tolerantly_or_refused_naming_both_versions() -> None:
    assert V1.read({"parcel": "p", "weight": 3}, 2) == V1(parcel="p")
    with pytest.raises(SchemaViolation, match="version 3, newer than this consumer's version 1"):
        V1.read({"parcel_id": "p", "carrier": "van"}, 3)


def test_a_missing_upcaster_or_a_failing_one_is_a_schema_violation() -> None:
    class Gap(Event, version=3):
        x: int

    @upcaster(Gap, from_version=2)
    def two(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "x": int(data["x"])}

    with pytest.raises(SchemaViolation, match="no upcaster from version 1"):
        Gap.read({"x": 1}, 1)
    with pytest.raises(SchemaViolation, match="upcaster from version 2 failed: ValueError"):
        Gap.read({"x": "not a number"}, 2)


@pytest.mark.parametrize(
    ("declare", "says"),
    [
        (lambda: upcaster(V1, from_version=1), "from_version must be from 1 to 0"),
        (lambda: upcaster(V3, from_version=3), "from_version must be from 1 to 2"),
        (lambda: upcaster(V3, from_version=1)(rename_parcel), "already has an upcaster"),
        (lambda: type("Bad", (Event,), {}, version=0), "version must be an integer from 1"),
    ],
)
def test_bad_version_declarations_fail_at_once(declare: Any, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        declare()


def envelope(**attributes: Any) -> bytes:
    doc = {"specversion": "1.0", "id": "e1", "source": "s", "type": "Shipment", "data": {}}
    return orjson.dumps({**doc, **attributes})


@pytest.mark.parametrize(
    ("dataschema", "version"),
    [
        (None, 1),
        ("urn:choreograph:Shipment:v1", 1),
        ("urn:choreograph:Shipment:v12", 12),
        ("urn:choreograph:Shipment:v999999", 999_999),
    ],
)
def test_the_version_is_read_from_dataschema(dataschema: str | None, version: int) -> None:
    extra = {} if dataschema is None else {"dataschema": dataschema}
    assert schema_version(decode(envelope(**extra))) == version


@pytest.mark.parametrize(
    ("dataschema", "says"),
    [
        ("https://example.com/shipment.json", "is not of the form"),
        ("urn:choreograph:Shipment:2", "is not of the form"),
        ("urn:choreograph:Shipment:v²", "is not of the form"),
        ("urn:choreograph:Parcel:v2", "names another type"),
        ("urn:choreograph:Shipment:v0", "versions start at 1"),
        ("urn:choreograph:Shipment:v1000000", "versions start at 1"),
        ("urn:choreograph:Shipment:v1:v2", "names another type"),  # the version is the last
    ],
)
def test_a_dataschema_not_written_so_is_refused(dataschema: str, says: str) -> None:
    with pytest.raises(MalformedEnvelope, match=says):
        schema_version(decode(envelope(dataschema=dataschema)))


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("urn:choreograph:Shipment:" + "x" * 300, " is not of the form"),
        ("urn:choreograph:" + "P" * 300 + ":v2", " names another type than Shipment"),
        ("urn:choreograph:Shipment:v" + "0" * 300, ": versions start at 1"),
    ],
)
def test_a_refused_dataschema_is_quoted_up_to_200_characters(uri: str, says: str) -> None:
    with pytest.raises(MalformedEnvelope) as refused:
        schema_version(decode(envelope(dataschema=uri)))
    assert str(refused.value).startswith(f"dataschema {uri[:200]!r}{says}")


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        'Application/JSON;charset="UTF-8"',
        "application/json; charset=utf8",
        "application/json; charset=utf-8; profile=x",  # the type is what comes before the first ';'
    ],
)
def test_json_content_types_with_parameters_are_accepted(content_type: str) -> None:
    assert decode(envelope(datacontenttype=content_type)).type == "Shipment"


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/json; charset=latin-1",
        "application/jsonx",
        "application/json;profile=x;charset=latin-1",  # every parameter counts, not the first
        "application/json; charset=latin-1=utf-8",  # the value is all after the first '='
        "application/json; charset=utf-8X",  # only quotes are taken off the value
    ],
)
def test_other_content_types_are_refused(content_type: str) -> None:
    with pytest.raises(MalformedEnvelope, match="unsupported datacontenttype"):
        decode(envelope(datacontenttype=content_type))


class Ordered(Event):
    order_id: str


class Paid(Event):
    order_id: str


def shop(seen: list[str]) -> App:
    ordering = Service("ordering", emits=[Ordered])
    payment = Service("payment")

    @payment.on(Ordered, emits=[Paid])
    async def pay(event: Ordered, ctx: Context) -> Paid:
        seen.append(event.order_id)
        return Paid(order_id=event.order_id)

    @payment.on(Paid)
    async def note(event: Paid, ctx: Context) -> None:
        seen.append(f"paid {event.order_id}")

    return App("shop", [ordering, payment], terminal=[Paid])


async def test_an_event_on_another_types_topic_is_dead_lettered_not_routed_by_its_type() -> None:
    seen: list[str] = []
    async with Harness(shop(seen)) as h:
        # given a Paid event published on Ordered's topic (payment reacts to both)
        body = orjson.dumps(
            {"specversion": "1.0", "id": "x1", "source": "t", "type": "Paid",
             "data": {"order_id": "o1"}}
        )  # fmt: skip
        await h.transport.publish([Message("x1", "Ordered", body)])
        await h.publish(Ordered(order_id="o2"), correlation_id="tx-2")
        await h.wait_for(Paid, correlation_id="tx-2")

        # then it is dead-lettered with that reason, and never handled as a Paid
        (dead,) = await h.dead_letters("payment")
        assert dead.failure.reason == "topic and type disagree"
        assert "'Paid' came on topic 'Ordered'" in dead.failure.error
        assert "paid o1" not in seen


async def test_emitted_events_carry_their_version_and_a_json_content_type_with_charset_flows() -> (
    None
):
    seen: list[str] = []
    async with Harness(shop(seen)) as h:
        body = orjson.dumps(
            {"specversion": "1.0", "id": "y1", "source": "node", "type": "Ordered",
             "datacontenttype": "application/json; charset=utf-8", "data": {"order_id": "o3"}}
        )  # fmt: skip
        await h.transport.publish([Message("y1", "Ordered", body)])
        paid = await h.wait_for(Paid, correlation_id="y1")
        assert paid.data == {"order_id": "o3"} and await h.dead_letters("payment") == []
        assert paid.dataschema == "urn:choreograph:Paid:v1"
