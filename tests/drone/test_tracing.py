"""Tracing a delivery without an orchestrator: correlation and causation on every event, and a wire
format the official CloudEvents SDK reads (and writes) as it is."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence

import orjson
import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from cloudevents.v1.http import from_json

from choreograph import PermanentFailure
from choreograph.demo import create_app, package
from choreograph.demo.events import (
    DeliveryCancelRequested,
    DeliveryCompleted,
    DeliveryFailed,
    DroneScheduled,
    PackageReady,
)
from choreograph.demo.knobs import chance
from choreograph.envelope import Envelope
from choreograph.pytest_plugin import HarnessFactory
from choreograph.testing import Harness
from choreograph.transport import Message
from tests.drone.conftest import (
    advance_until,
    calm_knobs,
    delivery_requested,
    request,
)


def capture(h: Harness) -> list[bytes]:
    """Keep the raw body of every message published on the harness' bus."""
    bodies: list[bytes] = []
    publish = h.transport.publish

    async def recording(messages: Sequence[Message]) -> None:
        await publish(messages)
        bodies.extend(m.body for m in messages)

    h.transport.publish = recording  # type: ignore[method-assign]
    return bodies


def delivery_id(prefix: str, *, slow: bool) -> str:
    """A fresh delivery id whose drone answers late (or not) under ``slow_drone_rate=0.5``."""
    while True:
        candidate = f"{prefix}-{uuid.uuid4().hex[:8]}"
        if chance(0.5, "slow", candidate) == slow:
            return candidate


@pytest.fixture
async def mixed_run(
    harness: HarnessFactory, monkeypatch: pytest.MonkeyPatch
) -> tuple[Harness, dict[str, Envelope], list[bytes]]:
    """One run with every kind of ending: completed, rejected, cancelled before scheduling, timed
    out (a late drone) and a participant that gave up (HandlerFailed). Returns the harness, each
    delivery's DeliveryRequested envelope by delivery id, and the raw bodies published."""
    ids = {
        "completed": delivery_id("d-ok", slow=False),
        "rejected": delivery_id("d-heavy", slow=False),
        "cancelled": delivery_id("d-cancel", slow=True),
        "timed out": delivery_id("d-late", slow=True),
        "gave up": delivery_id("d-give-up", slow=False),
    }

    def fail_one(knobs: object, service: str, delivery_id: str, attempt: int) -> None:
        if delivery_id == ids["gave up"]:
            raise PermanentFailure("package store is on fire")

    monkeypatch.setattr(package, "maybe_fail", fail_one)
    knobs = calm_knobs(join_timeout=3, slow_drone_rate=0.5, slow_drone_seconds=5)
    h = await harness(create_app(knobs))
    bodies = capture(h)
    requests: dict[str, Envelope] = {}
    for number, (name, did) in enumerate(ids.items()):
        await request(h, delivery_requested(number, delivery_id=did,
                                            weight_kg=50 if name == "rejected" else 2))  # fmt: skip
        requests[did] = h.published("DeliveryRequested", did)[0]
    cancelled = ids["cancelled"]
    await h.wait_for(PackageReady, correlation_id=cancelled)
    await h.publish(DeliveryCancelRequested(delivery_id=cancelled), correlation_id=cancelled)
    await h.advance(6)  # past the join timeout and the late drones
    await advance_until(h, DeliveryFailed, ids["gave up"], within=10)
    assert h.published(DeliveryCompleted, ids["completed"])
    for name in ("rejected", "cancelled", "timed out", "gave up"):
        assert h.published(DeliveryFailed, ids[name]), name
    assert len(h.published(DroneScheduled, ids["timed out"])) == 1, "the late drone answered"
    return h, requests, bodies


async def test_every_event_carries_its_delivery_as_correlation_id(
    mixed_run: tuple[Harness, dict[str, Envelope], list[bytes]],
) -> None:
    # given
    h, requests, _ = mixed_run
    # then
    assert {e.correlationid for e in h.events} == set(requests)
    for envelope in h.events:
        about = envelope.data.get("delivery_id") or envelope.data.get("data", {}).get("delivery_id")
        assert about == envelope.correlationid, envelope


async def test_causation_links_lead_from_every_event_back_to_its_request(
    mixed_run: tuple[Harness, dict[str, Envelope], list[bytes]],
) -> None:
    # given
    h, requests, _ = mixed_run
    by_id = {e.id: e for e in h.events}
    types = {e.type for e in h.events}
    assert {"choreograph.HandlerFailed", "DeliveryCancelRequested", "DroneArrived"} <= types
    roots: dict[str, set[str]] = defaultdict(set)
    # then
    for envelope in h.events:
        hops, current = 0, envelope
        while current.causationid is not None:
            assert current.causationid in by_id, f"{current.type} names an unknown cause"
            current = by_id[current.causationid]
            assert current.correlationid == envelope.correlationid
            hops += 1
            assert hops < 20, "causation cycle"
        roots[envelope.type].add(current.type)
        if current.type == "DeliveryCancelRequested":
            assert current.source == "harness", "a cancel comes from outside: it starts a chain"
        else:
            assert current.id == requests[envelope.correlationid].id, envelope.type
    # the cancel is the cause of the cancelled delivery's failure, the request of all the rest
    assert roots["DeliveryFailed"] == {"DeliveryRequested", "DeliveryCancelRequested"}
    assert roots["DeliveryCompleted"] == {"DeliveryRequested"}


async def test_the_official_sdk_parses_every_published_message_with_its_extensions(
    mixed_run: tuple[Harness, dict[str, Envelope], list[bytes]],
) -> None:
    # given
    h, _, bodies = mixed_run
    assert len(bodies) == len(h.events)
    for body, envelope in zip(bodies, h.events, strict=True):
        # when
        event = JSONFormat().read(None, body)
        legacy = from_json(body)
        # then
        assert isinstance(event, CloudEvent)
        assert event.get_specversion() == "1.0"
        assert (event.get_id(), event.get_type(), event.get_source()) == (
            envelope.id,
            envelope.type,
            envelope.source,
        )
        when = event.get_time()
        assert when is not None and when.tzinfo is not None
        assert event.get_datacontenttype() == "application/json"
        assert event.get_data() == envelope.data
        assert event.get_extension("correlationid") == envelope.correlationid
        assert event.get_extension("causationid") == envelope.causationid
        assert legacy["correlationid"] == envelope.correlationid
        assert legacy.data == envelope.data


async def test_an_event_written_by_the_official_sdk_runs_a_delivery(
    harness: HarnessFactory,
) -> None:
    # given a DeliveryRequested built by another stack, with an extension of its own
    h = await harness(create_app(calm_knobs()))
    event = delivery_requested(5)
    correlation = event.delivery_id
    sdk_event = CloudEvent(
        {
            "type": "DeliveryRequested",
            "source": "urn:other-stack",
            "correlationid": correlation,
            "tenantid": "acme",
        },
        event.to_data(),
    )
    body = JSONFormat().write(sdk_event)
    assert orjson.loads(body)["tenantid"] == "acme"
    # when
    await h.transport.publish([Message(sdk_event.get_id(), "DeliveryRequested", body)])
    await h.wait_for(PackageReady, correlation_id=correlation)
    await h.advance(1)
    # then the delivery completes, in the transaction the foreign event named
    completed = await h.wait_for(DeliveryCompleted, correlation_id=correlation)
    assert completed.correlationid == correlation
    chain = {e.id: e for e in h.events}
    cause = chain[completed.causationid or ""]
    while cause.causationid:
        cause = chain[cause.causationid]
    assert cause.id == sdk_event.get_id()
    assert cause.extensions == {"tenantid": "acme"}
