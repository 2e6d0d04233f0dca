"""Bad input on the bus: each poison message is dead-lettered with its reason while the rest of
the drone delivery flows; a dead letter replayed with ``choreograph dlq replay`` goes back to its
own group only."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from choreograph import Context, Event, PermanentFailure, RetryPolicy, Runtime, WorkerSettings
from choreograph.demo import create_app, package
from choreograph.demo.events import DeliveryCompleted
from choreograph.envelope import MAX_EVENT_BYTES, Envelope, encode
from choreograph.transport import DeadLetter, Message, transport_from_url
from tests.drone.conftest import Recorder, calm_knobs, request_body
from tests.support.procs import choreograph_command, clean_env
from tests.support.quiet import wait_until_quiet

QUICK = RetryPolicy(max_attempts=3, immediate=1, base_delay=0.05, jitter=0)
REQUEST_GROUPS = ("package", "drone-scheduler", "delivery")  # every group of DeliveryRequested


@dataclass
class Bus:
    """The drone app running in this process on an embedded SQLite bus file."""

    url: str
    runtime: Runtime
    recorder: Recorder

    async def publish_raw(self, topic: str, body: bytes, *, limit: int = MAX_EVENT_BYTES) -> str:
        """Publish bytes as another producer would, through its own connection."""
        event_id = str(uuid.uuid4())
        producer = transport_from_url(self.url)
        producer.max_message_bytes = limit
        async with producer:
            await producer.publish([Message(event_id, topic, body)])
        return event_id

    async def request(self, body: dict[str, Any]) -> str:
        envelope = Envelope(
            id=str(uuid.uuid4()),
            type="DeliveryRequested",
            source="test",
            correlationid=body["delivery_id"],
            data=body,
        )
        await self.runtime.transport.publish(
            [Message(envelope.id, envelope.type, encode(envelope))]
        )
        return str(body["delivery_id"])

    async def status(self, delivery_id: str) -> str | None:
        async with self.runtime.unit_of_work("delivery") as uow:
            doc = await uow.state.get("delivery", delivery_id)
        return None if doc is None else str(doc["status"])

    async def wait(self, what: Callable[[], Any], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not await what():
            assert time.monotonic() < deadline, f"timed out waiting for {what.__name__}"
            await asyncio.sleep(0.02)

    async def dead_letters(self) -> list[DeadLetter]:
        return await self.runtime.transport.dead_letters(None, 10_000)


BusFactory = Callable[..., Awaitable[Bus]]


@pytest.fixture
async def make_bus(tmp_path: Path) -> AsyncIterator[BusFactory]:
    runtimes: list[Runtime] = []

    async def make(tune: Callable[[Any], None] = lambda app: None) -> Bus:
        app = create_app(calm_knobs(flight_seconds=0.05, join_timeout=30))
        for service in app.services.values():
            service.retry = QUICK if service.name != "drone-scheduler" else service.retry
        tune(app)
        recorder = Recorder()
        url = f"sqlite:///{tmp_path}/bus.db"
        runtime = Runtime(
            app,
            transport=url,
            store=f"sqlite:///{tmp_path}/{{service}}.db",
            middleware=[recorder],
            settings=WorkerSettings(poll_interval=0.1),
        )
        await runtime.start()
        runtimes.append(runtime)
        return Bus(url, runtime, recorder)

    yield make
    for runtime in runtimes:
        await runtime.stop()


def envelope_body(event_type: str, payload: dict[str, Any], **attributes: Any) -> bytes:
    """A CloudEvent with ``payload`` as its data; ``attributes`` override any attribute."""
    envelope = Envelope(
        id=str(uuid.uuid4()), type=event_type, source="test", correlationid="c-1", data=payload
    )
    return orjson.dumps({**envelope.to_dict(), **attributes})


POISON: dict[str, tuple[bytes, str, str]] = {
    # name: (body, reason, words of the error)
    "not json": (b'{"specversion": "1.0", "id": ', "malformed envelope", "not JSON"),
    "not an object": (b'["DeliveryRequested"]', "malformed envelope", "expected a JSON object"),
    "no cloudevent": (b'{"type": "DeliveryRequested"}', "malformed envelope", "id, source"),
    "data not an object": (
        envelope_body("DeliveryRequested", {}, data=[1, 2]),
        "malformed envelope",
        "'data' must be a JSON object",
    ),
    "another type on this topic": (
        envelope_body("drones.Mystery", request_body(90)),
        "topic and type disagree",
        "'drones.Mystery' came on topic 'DeliveryRequested'",
    ),
    "schema violation": (
        envelope_body("DeliveryRequested", {**request_body(91), "pickup": {"latitude": 500}}),
        "schema violation",
        "pickup.latitude",
    ),
    "oversized": (
        envelope_body("DeliveryRequested", {**request_body(92), "padding": "x" * MAX_EVENT_BYTES}),
        "payload too large",
        f"the limit is {MAX_EVENT_BYTES}",
    ),
}


async def test_poison_messages_are_dead_lettered_with_their_reason_and_the_rest_flows(
    make_bus: BusFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a package handler that always raises for one delivery
    broken = request_body(0)["delivery_id"]

    def fail_one(knobs: object, service: str, delivery_id: str, attempt: int) -> None:
        if delivery_id == broken:
            raise RuntimeError("package database unavailable")

    monkeypatch.setattr(package, "maybe_fail", fail_one)
    bus = await make_bus()
    # when good requests and poison are published interleaved
    good: list[str] = []
    poison: dict[str, str] = {}
    for number, (name, (body, _, _)) in enumerate(POISON.items(), start=1):
        good.append(await bus.request(request_body(number)))
        poison[name] = await bus.publish_raw("DeliveryRequested", body, limit=2 * MAX_EVENT_BYTES)
    await bus.request(request_body(0, delivery_id=broken))
    good.append(await bus.request(request_body(99)))

    async def all_ended() -> bool:
        return all([await bus.status(d) == "completed" for d in good] +
                   [await bus.status(broken) == "failed"])  # fmt: skip

    await bus.wait(all_ended)
    # then each poison message is dead-lettered, with its reason, by every group that got it
    dead = await bus.dead_letters()
    for name, (_, reason, words) in POISON.items():
        mine = [d for d in dead if d.message.id == poison[name]]
        assert sorted(d.group for d in mine) == sorted(REQUEST_GROUPS), name
        for letter in mine:
            assert letter.failure.reason == reason, (name, letter.failure)
            assert words in letter.failure.error, (name, letter.failure)
            assert letter.attempts == 1, name
    # and the handler that always raised too, after its attempts
    (gave_up,) = [d for d in dead if d.message.id not in poison.values()]
    assert (gave_up.group, gave_up.failure.reason) == ("package", "attempts exhausted")
    assert (gave_up.failure.error_type, gave_up.failure.error) == (
        "RuntimeError", "package database unavailable")  # fmt: skip
    assert gave_up.attempts == QUICK.max_attempts
    assert orjson.loads(gave_up.message.body)["data"]["delivery_id"] == broken
    assert len(dead) == len(POISON) * len(REQUEST_GROUPS) + 1
    # and the worker is still running
    late = await bus.request(request_body(100))

    async def late_completed() -> bool:
        return await bus.status(late) == "completed"

    await bus.wait(late_completed)


async def test_a_replayed_dead_letter_goes_to_its_own_group_only(
    make_bus: BusFactory, tmp_path: Path
) -> None:
    # given notification fails on every DeliveryCompleted while it is broken
    broken = True

    def break_notification(app: Any) -> None:
        service = app.service("notification")
        spec = service.handlers[DeliveryCompleted]

        async def flaky(event: Event, ctx: Context) -> Any:
            if broken:
                raise RuntimeError("mail server down")
            return await spec.fn(event, ctx)

        service.handlers[DeliveryCompleted] = replace(spec, fn=flaky)

    bus = await make_bus(break_notification)
    did = await bus.request(request_body(1))
    dead = await wait_for_dead_letter(bus)
    assert (dead.group, dead.message.topic) == ("notification", "DeliveryCompleted")
    assert await bus.status(did) == "completed", "a failed notification fails no delivery"
    # when it is inspected and replayed with the CLI, once fixed
    listed = [orjson.loads(line) for line in (await cli("dlq", "list", "--json", "--transport",
                                                        bus.url)).splitlines()]  # fmt: skip
    assert [(d["id"], d["group"], d["reason"]) for d in listed] == [
        (dead.id, "notification", "attempts exhausted")
    ]
    shown = orjson.loads(await cli("dlq", "show", dead.id, "--transport", bus.url))
    assert shown["error"] == "mail server down"
    assert shown["message"]["data"]["delivery_id"] == did
    before = list(bus.recorder.handled)
    broken = False
    out = await cli("dlq", "replay", dead.id, "--transport", bus.url)
    assert "replayed 1 of 1" in out

    async def notified() -> bool:
        async with bus.runtime.unit_of_work("notification") as uow:
            sent = await uow.state.get("sent", did)
        return sent is not None

    await bus.wait(notified)
    await wait_until_quiet(bus.runtime)  # every group has handled all it got
    # then notification handled it again, as a first attempt; no other group saw it again
    again = [h for h in bus.recorder.handled[len(before) :] if h.event_id == dead.message.id]
    assert [(h.service, h.attempt, h.kind) for h in again] == [("notification", 1, "done")]
    subscribed = [s for s, w in bus.runtime.workers.items()
                  if "DeliveryCompleted" in w.handling.topics]  # fmt: skip
    assert len(subscribed) >= 3, subscribed
    assert not await bus.dead_letters()
    assert "no dead letters" in await cli("dlq", "list", "--transport", bus.url)


async def wait_for_dead_letter(bus: Bus, timeout: float = 10.0) -> DeadLetter:
    deadline = time.monotonic() + timeout
    while not (dead := await bus.dead_letters()):
        assert time.monotonic() < deadline, "nothing was dead-lettered"
        await asyncio.sleep(0.05)
    (only,) = dead
    return only


async def cli(*args: str) -> str:
    """Run ``choreograph ARGS`` in a subprocess (the event loop keeps running); return stdout."""
    proc = await asyncio.create_subprocess_exec(
        *choreograph_command(),
        *args,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, f"choreograph {' '.join(args)}: {err.decode()}{out.decode()}"
    return out.decode()


def near_limit(data: dict[str, Any], *, spare: int = 64) -> bytes:
    """A DeliveryRequested CloudEvent with ``data`` padded to ``spare`` bytes under the limit."""
    bare = envelope_body(
        "DeliveryRequested", {**data, "padding": ""}, correlationid=data["delivery_id"]
    )
    padding = "x" * (MAX_EVENT_BYTES - len(bare) - spare)
    body = envelope_body(
        "DeliveryRequested", {**data, "padding": padding}, correlationid=data["delivery_id"]
    )
    assert MAX_EVENT_BYTES - spare - 2 <= len(body) <= MAX_EVENT_BYTES
    return body


@pytest.mark.parametrize("kind", ["schema violation", "handler gives up"])
async def test_a_failure_of_a_message_just_under_the_size_limit_does_not_stop_the_worker(
    make_bus: BusFactory, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    # given a message just under the size limit that no handler can handle
    big = request_body(1)
    if kind == "schema violation":
        del big["owner_id"]
    else:

        def fail_big(knobs: object, service: str, delivery_id: str, attempt: int) -> None:
            if delivery_id == big["delivery_id"]:
                raise PermanentFailure("cannot handle this one")

        monkeypatch.setattr(package, "maybe_fail", fail_big)
    bus = await make_bus()
    poison = await bus.publish_raw("DeliveryRequested", near_limit(big))
    # when a good request follows it
    good = await bus.request(request_body(2))

    async def good_completed() -> bool:
        return await bus.status(good) == "completed"

    # then the big one is dead-lettered (its failure announced) and the good one completes
    await bus.wait(good_completed, timeout=5)
    dead = [d for d in await bus.dead_letters() if d.message.id == poison]
    assert dead, "the big message was dead-lettered"
    assert {d.failure.reason for d in dead} == {
        "schema violation" if kind == "schema violation" else "permanent failure"
    }
    assert await bus.status(big["delivery_id"]) == "failed"
