"""The ingestion HTTP API, in process (httpx over ASGI) on a memory:// runtime."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select

from choreograph import InvalidMessage, Runtime
from choreograph.demo import create_app
from choreograph.demo.ingestion import MAX_BODY_BYTES, create_http_app
from choreograph.demo.knobs import Knobs
from choreograph.demo.runner import post_request, sample_request
from choreograph.demo.tables import DeliveryRequestRow
from choreograph.envelope import Envelope, decode
from choreograph.transport import Message
from choreograph.transports.memory import MemoryTransport
from tests.drone.conftest import calm_knobs, request_body
from tests.support.quiet import wait_until_quiet

URL = "/api/deliveryrequests"


@dataclass
class Api:
    client: httpx.AsyncClient
    runtime: Runtime
    published: list[Envelope] = field(default_factory=list)

    def events(self, event_type: str, delivery_id: str) -> list[Envelope]:
        return [
            e for e in self.published if e.type == event_type and e.correlationid == delivery_id
        ]

    async def status(self, delivery_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/api/deliveries/{delivery_id}")
        assert response.status_code == 200, response.text
        doc: dict[str, Any] = response.json()
        return doc

    async def wait_status(
        self, delivery_id: str, done: Callable[[str], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            doc = await self.status(delivery_id)
            if done(doc["status"]) or time.monotonic() > deadline:
                return doc
            await asyncio.sleep(0.02)


async def start_api(knobs: Knobs) -> tuple[Api, Runtime]:
    transport = MemoryTransport()
    runtime = Runtime(create_app(knobs), transport=transport, store="memory://")
    api = Api(
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_http_app(runtime)), base_url="http://drone"
        ),
        runtime,
    )
    publish = transport.publish

    async def recording(messages: Sequence[Message]) -> None:
        await publish(messages)
        api.published.extend(decode(m.body) for m in messages)

    transport.publish = recording  # type: ignore[method-assign]
    await runtime.start()
    return api, runtime


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    client, runtime = await start_api(calm_knobs(flight_seconds=0.05))
    yield client
    await client.client.aclose()
    await runtime.stop()


@pytest.fixture
async def stuck_api() -> AsyncIterator[Api]:
    """A system whose drone-scheduler never answers: deliveries stay requested (for cancels)."""
    client, runtime = await start_api(calm_knobs(silent_drone_scheduler=True, join_timeout=60))
    yield client
    await client.client.aclose()
    await runtime.stop()


def post(api: Api, body: Any, **kwargs: Any) -> Any:
    return api.client.post(URL, json=body, **kwargs)


# accepted requests -------------------------------------------------------------------------------


async def test_a_good_request_is_accepted_and_its_status_followed_to_the_end(api: Api) -> None:
    # given
    body = request_body(1)
    did = body["delivery_id"]
    # when
    response = await post(api, body)
    # then
    assert response.status_code == 202
    assert response.headers["location"] == f"/api/deliveries/{did}"
    assert response.json() == {"delivery_id": did, "status": "accepted"}
    (requested,) = api.events("DeliveryRequested", did)
    assert requested.data["package"]["package_id"] == body["package"]["package_id"]
    status = await api.client.get(response.headers["location"])
    assert status.status_code == 200
    assert status.json()["delivery_id"] == did
    assert status.json()["status"] in ("requested", "in_flight", "completed")
    final = await api.wait_status(did, lambda s: s == "completed")
    assert final["status"] == "completed"
    assert final["drone_id"].startswith("drone-")


async def test_a_request_without_an_id_gets_one(api: Api) -> None:
    # given
    body = request_body(2)
    del body["delivery_id"]
    # when
    response = await post(api, body)
    # then
    assert response.status_code == 202
    did = response.json()["delivery_id"]
    assert response.headers["location"] == f"/api/deliveries/{did}"
    assert len(api.events("DeliveryRequested", did)) == 1


async def test_posting_the_same_delivery_id_again_makes_one_delivery(api: Api) -> None:
    # given
    body = request_body(3)
    did = body["delivery_id"]
    # when posted five times at once, then once more later
    responses = await asyncio.gather(*(post(api, body) for _ in range(5)))
    await api.wait_status(did, lambda s: s == "completed")
    responses.append(await post(api, body))
    # then
    assert {r.status_code for r in responses} == {202}
    assert {r.headers["location"] for r in responses} == {f"/api/deliveries/{did}"}
    assert len(api.events("DeliveryRequested", did)) == 1
    await wait_until_quiet(api.runtime)
    assert len(api.events("DeliveryCompleted", did)) == 1
    assert (await api.status(did))["status"] == "completed"


async def request_rows(api: Api) -> dict[str, DeliveryRequestRow]:
    async with api.runtime.unit_of_work("ingestion") as uow:
        return {
            row.delivery_id: row for row in await uow.session.scalars(select(DeliveryRequestRow))
        }


async def test_a_request_is_a_row_committed_with_its_event_once(api: Api) -> None:
    # given
    body = request_body(4)
    did = body["delivery_id"]
    # when it is posted twice at once
    await asyncio.gather(post(api, body), post(api, body))
    # then one row holds it, committed with its one event
    row = (await request_rows(api))[did]
    assert row.owner_id == body["owner_id"]
    assert row.request["package"]["package_id"] == body["package"]["package_id"]
    (requested,) = api.events("DeliveryRequested", did)
    assert requested.data["owner_id"] == row.owner_id


async def test_a_request_whose_unit_of_work_fails_leaves_no_row_and_no_event(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given an event that cannot be staged (over the size the outbox accepts)
    monkeypatch.setattr(api.runtime.worker("ingestion").handling, "max_event_bytes", 64)
    body = request_body(5)
    did = body["delivery_id"]
    # when it is posted, the unit of work fails after the row was added
    with pytest.raises(InvalidMessage):
        await post(api, body)
    # then neither the row nor the event nor the status exist
    assert did not in await request_rows(api)
    assert api.events("DeliveryRequested", did) == []
    assert (await api.client.get(f"/api/deliveries/{did}")).status_code == 404


# status and cancel --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/deliveries/no-such-delivery"),
        ("DELETE", "/api/deliveryrequests/no-such-delivery"),
        ("GET", "/api/deliveries/d%00x"),
        ("GET", "/api/deliveries/%E2%80%AEevil"),
    ],
)
async def test_an_unknown_delivery_is_404(api: Api, method: str, path: str) -> None:
    response = await api.client.request(method, path)
    assert response.status_code == 404
    assert "no delivery" in response.json()["error"]


async def test_a_path_outside_the_api_is_404(api: Api) -> None:
    response = await api.client.get("/api/deliveries/..%2F..%2Fetc%2Fpasswd")
    assert response.status_code == 404


async def test_a_cancel_is_accepted_then_refused_once_the_delivery_ended(stuck_api: Api) -> None:
    # given a delivery waiting for a drone
    body = request_body(4)
    did = body["delivery_id"]
    assert (await post(stuck_api, body)).status_code == 202
    # when
    first = await stuck_api.client.delete(f"{URL}/{did}")
    final = await stuck_api.wait_status(did, lambda s: s == "failed")
    second = await stuck_api.client.delete(f"{URL}/{did}")
    # then
    assert first.status_code == 202
    assert first.json() == {"delivery_id": did, "status": "cancel requested"}
    assert final["status"] == "failed"
    assert final["reason"] == "cancelled: cancelled by the customer"
    assert second.status_code == 409
    assert "already failed" in second.json()["error"]
    assert len(stuck_api.events("DeliveryFailed", did)) == 1


async def test_concurrent_cancels_fail_the_delivery_once(stuck_api: Api) -> None:
    # given
    body = request_body(12)
    did = body["delivery_id"]
    await post(stuck_api, body)
    # when
    responses = await asyncio.gather(*(stuck_api.client.delete(f"{URL}/{did}") for _ in range(5)))
    await stuck_api.wait_status(did, lambda s: s == "failed")
    await wait_until_quiet(stuck_api.runtime)
    # then
    assert {r.status_code for r in responses} == {202}
    assert len(stuck_api.events("DeliveryFailed", did)) == 1


async def test_a_cancel_of_a_completed_delivery_is_409(api: Api) -> None:
    body = request_body(5)
    did = body["delivery_id"]
    await post(api, body)
    await api.wait_status(did, lambda s: s == "completed")
    response = await api.client.delete(f"{URL}/{did}")
    assert response.status_code == 409
    assert "already completed" in response.json()["error"]
    assert not api.events("DeliveryCancelRequested", did)


# bad requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b'{"owner_id": ', b"not json at all", b"", b"[" * 5000 + b"]" * 5000, b"\xff\xfe{}"],
    ids=["truncated", "text", "empty", "deeply-nested", "not-utf8"],
)
async def test_malformed_json_is_400(api: Api, content: bytes) -> None:
    response = await api.client.post(
        URL, content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("malformed JSON")
    assert not api.published


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_a_wrong_content_type_is_415(api: Api, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = await api.client.post(URL, content=orjson.dumps(request_body(6)), headers=headers)
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]
    assert not api.published


async def test_an_oversized_body_is_413(api: Api) -> None:
    body = request_body(7, padding="x" * (MAX_BODY_BYTES + 1))
    response = await post(api, body)
    assert response.status_code == 413
    assert str(MAX_BODY_BYTES) in response.json()["error"]
    assert not api.published


async def test_an_oversized_streamed_body_without_length_is_413(api: Api) -> None:
    # given a chunked body with no content-length header
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"owner_id": "'
        for _ in range(40):
            yield b"x" * 1024
        yield b'"}'

    # when
    response = await api.client.post(
        URL, content=chunks(), headers={"content-type": "application/json"}
    )
    # then
    assert response.status_code == 413
    assert not api.published


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        (lambda b: b.pop("owner_id"), ["owner_id"]),
        (lambda b: b["pickup"].update(latitude=91), ["pickup.latitude"]),
        (
            lambda b: b["package"].update(size="huge", weight_kg=-1),
            ["package.size", "package.weight_kg"],
        ),
        (lambda b: b.update(surprise=True), ["surprise"]),
        (lambda b: b.update(expedited="maybe", dropoff="here"), ["dropoff", "expedited"]),
        # strict: no bool taken as a number, no string as a number or a bool
        (lambda b: b["pickup"].update(latitude=True), ["pickup.latitude"]),
        (lambda b: b["dropoff"].update(longitude="-122.2"), ["dropoff.longitude"]),
        (lambda b: b["package"].update(weight_kg="2"), ["package.weight_kg"]),
        (lambda b: b.update(expedited="true"), ["expedited"]),
        (lambda b: b.update(expedited=1), ["expedited"]),
    ],
    ids=[
        "missing",
        "out-of-range",
        "two-in-one",
        "unknown-field",
        "wrong-types",
        "bool-as-number",
        "string-as-number",
        "string-as-weight",
        "string-as-bool",
        "int-as-bool",
    ],
)
async def test_a_schema_violation_is_422_naming_the_fields(
    api: Api, change: Callable[[dict[str, Any]], Any], fields: list[str]
) -> None:
    # given
    body = request_body(8)
    change(body)
    # when
    response = await post(api, body)
    # then
    assert response.status_code == 422
    problems = response.json()["problems"]
    assert response.json()["error"] == "invalid delivery request"
    named = {p.split(":", 1)[0] for p in problems}
    assert set(fields) <= named, problems
    assert not api.published


@pytest.mark.parametrize("body", [[1, 2], "a string", 42, None], ids=["list", "str", "int", "null"])
async def test_a_body_that_is_not_an_object_is_422(api: Api, body: Any) -> None:
    response = await api.client.post(
        URL, content=orjson.dumps(body), headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["problems"]
    assert not api.published


# hostile strings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field_path", "value"),
    [
        (("delivery_id",), "d" * 65),
        (("owner_id",), "o" * 10_000),
        (("owner_id",), "owner\x00null"),
        (("owner_id",), "owner\nX-Injected: 1"),
        (("delivery_id",), "../../etc/passwd"),
        (("delivery_id",), "d-\u202etxt.exe"),
        (("delivery_id",), "délivery-ü"),
        (("owner_id",), "'; DROP TABLE state; --"),
        (("package", "tag"), "t" * 201),
        (("package", "size"), "small\x00"),
    ],
    ids=[
        "long-id",
        "very-long",
        "nul",
        "newline",
        "traversal",
        "bidi",
        "non-ascii-id",
        "sql",
        "long-tag",
        "nul-enum",
    ],
)
async def test_hostile_identifiers_are_refused(
    api: Api, field_path: tuple[str, ...], value: str
) -> None:
    # given
    body = request_body(9)
    target = body
    for name in field_path[:-1]:
        target = target[name]
    target[field_path[-1]] = value
    # when
    response = await post(api, body)
    # then
    assert response.status_code == 422
    assert ".".join(field_path) in response.json()["problems"][0]
    assert not api.published


@pytest.mark.parametrize(
    "tag",
    ["fragile \u2603 \U0001f681 \u202e", "ctrl \x00\x01\x1b[31m red", "<script>alert(1)</script>",
     "'; DROP TABLE state; --", "\ud7ff\ue000\ufffd"],
    ids=["unicode", "control", "html", "sql", "edge-codepoints"],
)  # fmt: skip
async def test_hostile_free_text_is_stored_and_carried_verbatim(api: Api, tag: str) -> None:
    # given a free-text field within its length limit
    body = request_body(10)
    body["package"]["tag"] = tag
    did = body["delivery_id"]
    # when
    response = await post(api, body)
    # then it travels the bus unchanged and the delivery goes on as usual
    assert response.status_code == 202
    (requested,) = api.events("DeliveryRequested", did)
    assert requested.data["package"]["tag"] == tag
    assert (await api.wait_status(did, lambda s: s == "completed"))["status"] == "completed"


async def test_a_lone_surrogate_is_refused_cleanly(api: Api) -> None:
    # given JSON with an escaped lone surrogate (valid JSON text, not valid Unicode)
    content = orjson.dumps(request_body(11)).replace(b'"owner-11"', b'"owner-\\ud800"')
    # when
    response = await api.client.post(
        URL, content=content, headers={"content-type": "application/json"}
    )
    # then
    assert response.status_code in (400, 422)
    assert not api.published


async def test_the_demo_sends_a_request_again_when_its_connection_fails_under_it() -> None:
    # given an ingestion endpoint whose connection breaks under the first request (a keep-alive
    # connection the server closes as the request goes out), then accepts
    calls: list[bytes] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        calls.append(request.content)
        if len(calls) == 1:
            raise httpx.ReadError("connection reset by peer", request=request)
        return httpx.Response(202, json={"status": "accepted"})

    body = sample_request(7)
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(endpoint), base_url="http://ingestion"
    ) as client:
        # when the demo posts a delivery request
        response = await post_request(client, body)

    # then it was sent again, the same request (ingestion accepts its delivery id once)
    assert response.status_code == 202
    assert len(calls) == 2 and calls[0] == calls[1]
    assert orjson.loads(calls[1])["delivery_id"] == body["delivery_id"]


async def test_the_demo_gives_up_on_a_request_whose_connection_keeps_failing() -> None:
    def endpoint(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(endpoint), base_url="http://ingestion"
    ) as client:
        with pytest.raises(httpx.ConnectError):
            await post_request(client, sample_request(8), attempts=2)
