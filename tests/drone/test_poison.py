"""The poison cases of the drone delivery, replayed: each poison message, published once by a
foreign producer, is dead-lettered with its reason while 20 valid deliveries complete; a message
that breaks its whole batch's transaction is isolated; failures of failure handlers end after a
bounded number of announcements."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from choreograph import Context, Envelope, Middleware, Outcome, RetryPolicy, Runtime
from choreograph.demo import create_app
from choreograph.demo.ingestion import create_http_app
from choreograph.envelope import encode
from choreograph.events import MAX_ANNOUNCEMENT_DEPTH
from choreograph.runtime.worker import POISON_ATTEMPTS, WorkerSettings
from choreograph.transport import DeadLetter, Message, transport_from_url
from tests.drone.conftest import calm_knobs, request_body
from tests.stores.conftest import PG_URL, drop_schemas
from tests.support.brokers import POSTGRES

QUICK = RetryPolicy(max_attempts=3, immediate=1, base_delay=0.05, jitter=0)
REQUEST_GROUPS = ("delivery", "drone-scheduler", "package")  # every group of DeliveryRequested
VALID = 20


@dataclass
class Watcher(Middleware):
    """Records what every settled handling announced."""

    emitted: list[Envelope] = field(default_factory=list)

    def on_outcome(self, ctx: Context, outcome: Outcome) -> None:
        self.emitted.extend(outcome.emitted)

    def announcements(self, correlation_id: str) -> list[Envelope]:
        return [
            e
            for e in self.emitted
            if e.type == "choreograph.HandlerFailed" and e.correlationid == correlation_id
        ]


@dataclass
class Drone:
    """The drone app in this process on a SQLite bus file, with its stores at ``store``."""

    url: str
    runtime: Runtime
    watcher: Watcher

    async def publish_raw(self, body: bytes, topic: str = "DeliveryRequested") -> str:
        """Publish bytes as a foreign producer would, through its own connection."""
        message_id = str(uuid.uuid4())
        async with transport_from_url(self.url) as producer:
            await producer.publish([Message(message_id, topic, body)])
        return message_id

    async def request(self, body: dict[str, Any], event_id: str | None = None) -> str:
        envelope = Envelope(
            id=event_id or str(uuid.uuid4()),
            type="DeliveryRequested",
            source="test",
            correlationid=body["delivery_id"],
            data=body,
        )
        await self.runtime.transport.publish(
            [Message(envelope.id, envelope.type, encode(envelope))]
        )
        return str(body["delivery_id"])

    async def requests(self, count: int = VALID) -> list[str]:
        return [await self.request(request_body(n)) for n in range(count)]

    async def status(self, delivery_id: str) -> str | None:
        async with self.runtime.unit_of_work("delivery") as uow:
            doc = await uow.state.get("delivery", delivery_id)
        return None if doc is None else str(doc["status"])

    async def wait(self, what: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not await what():
            assert time.monotonic() < deadline, f"timed out waiting for {what.__name__}"
            await asyncio.sleep(0.05)

    async def wait_completed(self, delivery_ids: list[str]) -> None:
        async def all_completed() -> bool:
            return all([await self.status(d) == "completed" for d in delivery_ids])

        await self.wait(all_completed)

    async def dead_letters(self, message_id: str | None = None) -> list[DeadLetter]:
        found = await self.runtime.transport.dead_letters(None, 10_000)
        return [d for d in found if message_id in (None, d.message.id)]


DroneFactory = Callable[..., Awaitable[Drone]]


@pytest.fixture
async def make_drone(tmp_path: Path, namespace: str) -> AsyncIterator[DroneFactory]:
    """``await make_drone(store="sqlite" | "postgres")``: the drone app running, quick retries."""
    runtimes: list[Runtime] = []
    postgres = False

    async def make(store: str = "sqlite") -> Drone:
        nonlocal postgres
        app = create_app(calm_knobs(flight_seconds=0.05, join_timeout=60))
        for service in app.services.values():
            service.retry = QUICK
        if store == "postgres":
            POSTGRES.require()
            postgres = True
            store_url = f"{PG_URL}?schema={namespace}_{{service}}"
        else:
            store_url = f"sqlite:///{tmp_path}/{{service}}.db"
        watcher = Watcher()
        url = f"sqlite:///{tmp_path}/bus.db"
        runtime = Runtime(
            app,
            transport=url,
            store=store_url,
            middleware=[watcher],
            settings=WorkerSettings(poll_interval=0.1),
        )
        await runtime.start()
        runtimes.append(runtime)
        return Drone(url, runtime, watcher)

    yield make
    for runtime in runtimes:
        await runtime.stop()
    if postgres:
        await drop_schemas(namespace)


def cloud_event(data: dict[str, Any], **attributes: Any) -> bytes:
    """A DeliveryRequested CloudEvent from outside; ``attributes`` override any attribute."""
    doc = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "foreign",
        "type": "DeliveryRequested",
        "correlationid": data.get("delivery_id"),
        "data": data,
    }
    doc.update(attributes)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def nested(levels: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    inner = doc
    for _ in range(levels):
        inner["deeper"] = {}
        inner = inner["deeper"]
    return doc


def assert_dead_lettered(dead: list[DeadLetter], reason: str, words: str) -> None:
    assert sorted(d.group for d in dead) == sorted(REQUEST_GROUPS), dead
    for letter in dead:
        assert letter.failure.reason == reason, letter.failure
        assert words in letter.failure.error, letter.failure


# issue case 1 ------------------------------------------------------------------------------------


async def test_data_nested_300_deep_failing_validation_is_dead_lettered_and_announced(
    make_drone: DroneFactory,
) -> None:
    # given a DeliveryRequested whose data fails validation and holds a field nested 300 deep
    drone = await make_drone()
    bad = request_body(900)
    del bad["owner_id"]
    bad["extra"] = nested(300)
    # when it is published beside 20 valid requests
    poison = await drone.publish_raw(cloud_event(bad))
    valid = await drone.requests()
    await drone.wait_completed(valid)

    async def failed() -> bool:
        return await drone.status(bad["delivery_id"]) == "failed"

    await drone.wait(failed)
    # then every group dead-lettered it as a schema violation, and announced it (short fields)
    assert_dead_lettered(await drone.dead_letters(poison), "schema violation", "owner_id")
    announced = drone.watcher.announcements(bad["delivery_id"])
    assert sorted(e.source for e in announced) == sorted(REQUEST_GROUPS)
    for envelope in announced:
        assert envelope.data["data"]["delivery_id"] == bad["delivery_id"]
        assert "extra" not in envelope.data["data"]


# issue case 2 ------------------------------------------------------------------------------------


async def test_a_180_kb_event_id_without_correlation_id_is_dead_lettered(
    make_drone: DroneFactory,
) -> None:
    # given a request whose event id is 180 KB long, with no correlation id
    drone = await make_drone()
    body = cloud_event(request_body(901), id="i" * 180_000, correlationid=None)
    # when it is published beside 20 valid requests
    poison = await drone.publish_raw(body)
    valid = await drone.requests()
    await drone.wait_completed(valid)

    async def dead_everywhere() -> bool:
        return len(await drone.dead_letters(poison)) == len(REQUEST_GROUPS)

    await drone.wait(dead_everywhere)
    # then every group dead-lettered it as malformed, naming the attribute
    assert_dead_lettered(await drone.dead_letters(poison), "malformed envelope", "'id' is 180000")
    assert not [e for e in drone.watcher.emitted if e.type == "choreograph.HandlerFailed"]


# issue case 3 ------------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_nul_characters_on_postgresql_stores_are_dead_lettered_and_the_rest_flows(
    make_drone: DroneFactory,
) -> None:
    # given the services on PostgreSQL stores
    drone = await make_drone("postgres")
    # when a request with a NUL in its event id, and one with a NUL in its correlation id, are
    # published beside 20 valid requests
    nul_id = await drone.publish_raw(cloud_event(request_body(902), id="d\x00id"))
    nul_correlation = await drone.publish_raw(
        cloud_event(request_body(903), correlationid="d-903\x00")
    )
    valid = await drone.requests()
    await drone.wait_completed(valid)

    async def both_dead() -> bool:
        return len(await drone.dead_letters()) == 2 * len(REQUEST_GROUPS)

    await drone.wait(both_dead)
    # then both are dead-lettered as malformed by every group, before any store saw them
    for poison, attribute in ((nul_id, "id"), (nul_correlation, "correlationid")):
        assert_dead_lettered(
            await drone.dead_letters(poison),
            "malformed envelope",
            f"'{attribute}' contains a control character",
        )


@pytest.mark.postgres
async def test_the_ingestion_api_answers_json_404_for_a_nul_id_on_postgresql(
    make_drone: DroneFactory,
) -> None:
    # given ingestion on a PostgreSQL store
    drone = await make_drone("postgres")
    app = create_http_app(drone.runtime)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://drone"
    ) as client:
        # when a status and a cancel are asked for an id holding a NUL
        status = await client.get("/api/deliveries/%00")
        cancel = await client.delete("/api/deliveryrequests/d%00x")
    # then both answer a JSON 404 saying what an id is
    for response in (status, cancel):
        assert response.status_code == 404
        assert "a delivery id is 1-64 letters" in response.json()["error"]


# a message that breaks its whole batch --------------------------------------------------------


async def refuse_in_inbox(drone: Drone, store: str, tmp_path: Path, namespace: str) -> None:
    """Make package's store refuse, at commit, the inbox row of any event id starting with
    'refused-' (a constraint of the database itself)."""
    if store == "postgres":
        import asyncpg  # type: ignore[import-untyped]

        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(
                f'ALTER TABLE "{namespace}_package".inbox ADD CONSTRAINT refused '
                "CHECK (event_id NOT LIKE 'refused-%')"
            )
        finally:
            await conn.close()
        return
    db = sqlite3.connect(tmp_path / "package.db")
    db.execute(
        "CREATE TRIGGER refused BEFORE INSERT ON inbox WHEN NEW.event_id LIKE 'refused-%' "
        "BEGIN SELECT RAISE(ABORT, 'this store refuses the row'); END"
    )
    db.commit()
    db.close()


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_message_that_fails_its_whole_batch_is_isolated_and_dead_lettered(
    make_drone: DroneFactory, tmp_path: Path, namespace: str, store: str
) -> None:
    # given a package store that refuses the inbox row of one valid request at commit, so that
    # every batch holding that request fails as a whole
    drone = await make_drone(store)
    await refuse_in_inbox(drone, store, tmp_path, namespace)
    # when it is published among 20 valid requests
    valid = [await drone.request(request_body(n)) for n in range(VALID // 2)]
    poison = await drone.request(request_body(904), event_id=f"refused-{uuid.uuid4()}")
    valid += [await drone.request(request_body(n)) for n in range(VALID // 2, VALID)]
    await drone.wait_completed(valid)

    async def dead() -> bool:
        return bool([d for d in await drone.dead_letters() if d.group == "package"])

    await drone.wait(dead)
    # then the package group dead-letters it alone, after its isolated attempts, with the reason
    (letter,) = await drone.dead_letters()
    assert orjson.loads(letter.message.body)["data"]["delivery_id"] == poison
    assert (letter.group, letter.failure.reason) == ("package", "poison message")
    assert letter.attempts == POISON_ATTEMPTS
    assert "fails on its own" in letter.failure.error


# announcement loops ------------------------------------------------------------------------------


async def test_a_failing_failure_handler_ends_after_a_bounded_number_of_announcements(
    make_drone: DroneFactory,
) -> None:
    # given a request without delivery_id whose correlation id is no valid delivery id: every
    # group gives up on it, and delivery's HandlerFailed handler then fails on every announcement
    drone = await make_drone()
    bad = request_body(905)
    del bad["delivery_id"]
    poison = await drone.publish_raw(cloud_event(bad, correlationid="not a delivery id!"))
    # when 20 valid requests follow
    valid = await drone.requests()
    await drone.wait_completed(valid)

    async def chains_ended() -> bool:
        found = [d for d in await drone.dead_letters() if "not announced" in d.failure.error]
        return len(found) == len(REQUEST_GROUPS)

    await drone.wait(chains_ended)
    # then each of the three failures was announced once per depth, never deeper than the limit
    announced = drone.watcher.announcements("not a delivery id!")
    depths = sorted(e.data["depth"] for e in announced)
    assert depths == sorted(list(range(1, MAX_ANNOUNCEMENT_DEPTH + 1)) * len(REQUEST_GROUPS))
    # and the original is dead-lettered by every group as a schema violation
    assert_dead_lettered(await drone.dead_letters(poison), "schema violation", "delivery_id")
    # and delivery dead-lettered each announcement it could not handle, the deepest unannounced
    delivery = [d for d in await drone.dead_letters() if d.message.topic.endswith("Failed")]
    assert len(delivery) == MAX_ANNOUNCEMENT_DEPTH * len(REQUEST_GROUPS)
    assert {d.group for d in delivery} == {"delivery"}
