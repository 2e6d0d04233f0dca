"""A duplicate storm: every event delivered several times changes nothing (inbox dedupe)."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from choreograph.demo import create_app
from choreograph.demo.events import (
    DeliveryCancelRequested,
    DeliveryRequested,
    PackageReady,
)
from choreograph.demo.knobs import chance
from choreograph.envelope import encode
from choreograph.pytest_plugin import HarnessFactory
from choreograph.testing import Harness
from choreograph.transport import Message
from tests.drone.conftest import (
    Recorder,
    calm_knobs,
    delivery_requested,
    fleet,
    packages,
    request,
)

TERMINAL = ("DeliveryCompleted", "DeliveryFailed")
KNOBS = calm_knobs(slow_drone_rate=0.5, slow_drone_seconds=4, join_timeout=2, fleet_size=10)


def pick(prefix: str, *, slow: bool) -> str:
    while True:
        candidate = f"{prefix}-{uuid.uuid4().hex[:8]}"
        if chance(KNOBS.slow_drone_rate, "slow", candidate) == slow:
            return candidate


def scenario() -> dict[str, DeliveryRequested]:
    """The requests (the same for both runs) by their expected ending."""
    ids = {
        "completed-1": pick("ok", slow=False),
        "completed-2": pick("ok", slow=False),
        "completed-3": pick("ok", slow=False),
        "rejected": pick("heavy", slow=False),
        "cancelled": pick("cancel", slow=True),
        "timed-out": pick("late", slow=True),
    }
    return {
        name: delivery_requested(
            number, delivery_id=did, weight_kg=60.0 if name == "rejected" else 1.0 + number
        )
        for number, (name, did) in enumerate(ids.items())
    }


def storm(h: Harness, copies: int) -> None:
    """From now on, every message published on the harness' bus is published ``copies`` times."""
    publish = h.transport.publish

    async def duplicating(messages: Sequence[Message]) -> None:
        for _ in range(copies):
            await publish(messages)

    h.transport.publish = duplicating  # type: ignore[method-assign]


async def run(h: Harness, requests: dict[str, DeliveryRequested]) -> None:
    for event in requests.values():
        await request(h, event)
    cancelled = requests["cancelled"].delivery_id
    await h.wait_for(PackageReady, correlation_id=cancelled)
    await h.publish(DeliveryCancelRequested(delivery_id=cancelled, reason="storm"),
                    correlation_id=cancelled)  # fmt: skip
    await h.advance(6)


async def final_state(h: Harness) -> dict[str, Any]:
    """Business state of every service (drone assignment order aside: drones by status)."""
    state: dict[str, Any] = {}
    reads = {"delivery": "delivery", "ingestion": "delivery", "notification": "sent"}
    for service, kind in reads.items():
        async with h.runtime.unit_of_work(service) as uow:
            docs = dict(await uow.state.find(kind, limit=10_000))
        for doc in docs.values():
            doc.pop("drone_id", None)
        state[service] = docs
    state["package"] = await packages(h.runtime)
    state["drone-scheduler"] = Counter(d["status"] for d in (await fleet(h.runtime)).values())
    return state


def terminal_ids(h: Harness) -> dict[str, set[tuple[str, str]]]:
    """(type, event id) of the terminal events of each delivery."""
    found: dict[str, set[tuple[str, str]]] = {}
    for envelope in h.events:
        if envelope.type in TERMINAL:
            found.setdefault(envelope.correlationid, set()).add((envelope.type, envelope.id))
    return found


async def test_a_duplicate_storm_ends_in_the_same_state_as_a_calm_run(
    harness: HarnessFactory,
) -> None:
    # given the same deliveries, once on a calm bus and once with every event published 3 times
    requests = scenario()
    calm = await harness(create_app(KNOBS))
    await run(calm, requests)
    recorder = Recorder()
    stormy = await harness(create_app(KNOBS), middleware=[recorder])
    storm(stormy, copies=3)
    # when
    await run(stormy, requests)
    # then
    expected = await final_state(calm)
    assert await final_state(stormy) == expected
    assert expected["drone-scheduler"] == Counter(free=10)
    outcome = {name: expected["delivery"][e.delivery_id]["status"] for name, e in requests.items()}
    assert outcome == {
        "completed-1": "completed",
        "completed-2": "completed",
        "completed-3": "completed",
        "rejected": "failed",
        "cancelled": "failed",
        "timed-out": "failed",
    }
    calm_terminal, stormy_terminal = terminal_ids(calm), terminal_ids(stormy)
    assert set(stormy_terminal) == {e.delivery_id for e in requests.values()}
    for did, events in stormy_terminal.items():
        assert len(events) == 1, f"{did} ended {len(events)} times: {events}"
        assert {t for t, _ in events} == {t for t, _ in calm_terminal[did]}
    stormy_types = Counter(e.type for e in {e.id: e for e in stormy.events}.values())
    calm_types = Counter(e.type for e in calm.events)
    assert stormy_types == calm_types
    assert len(stormy.events) == 3 * len(calm.events)
    for service in expected:  # every service did receive copies, and ran each event once
        handled = Counter(
            (r.event_id, r.handler) for r in recorder.of(service) if r.kind != "duplicate"
        )
        copies = Counter((r.event_id, r.handler) for r in recorder.of(service, "duplicate"))
        assert copies and set(copies) <= set(handled), service
        assert max(handled.values()) == 1, service


async def test_replaying_every_event_after_the_run_changes_nothing(
    harness: HarnessFactory,
) -> None:
    # given a finished run
    h = await harness(create_app(KNOBS))
    await run(h, scenario())
    before, published = await final_state(h), len(h.events)
    # when every event it published is published again, twice, newest first
    replay = [Message(e.id, e.type, encode(e)) for e in reversed(h.events)]
    for _ in range(2):
        await h.transport.publish(replay)
    await h.advance(6)
    # then nothing new is published, and the state is the same
    assert len(h.events) == published + 2 * len(replay)
    assert {e.id for e in h.events} == {m.id for m in replay}
    assert await final_state(h) == before
    assert not await h.dead_letters()


@pytest.mark.parametrize("ending", ["completed", "failed"])
async def test_a_request_repeated_after_its_delivery_ended_holds_nothing(
    harness: HarnessFactory, ending: str
) -> None:
    # given a delivery that ended
    h = await harness(create_app(KNOBS))
    event = delivery_requested(1, delivery_id=pick("again", slow=False),
                               weight_kg=2.0 if ending == "completed" else 60.0)  # fmt: skip
    did = await request(h, event)
    await h.advance(1)
    assert (await h.state("delivery", "delivery", did) or {})["status"] == ending
    before = await final_state(h)
    # when the same request arrives again as a new event (another producer, `choreograph publish`)
    await request(h, event)
    await h.advance(KNOBS.join_timeout + 1)
    # then no drone stays reserved, the package keeps its final status, nothing new ends
    after = await final_state(h)
    assert after["drone-scheduler"] == Counter(free=KNOBS.fleet_size)
    assert after["package"] == before["package"]
    assert len(terminal_ids(h)[did]) == 1
