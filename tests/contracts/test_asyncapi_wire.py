"""``choreograph asyncapi --server URL``: the document names what the transport really uses, and
the official @asyncapi/parser accepts it. On NATS the drone delivery's document is compared with
the consumers the app declares on the server, and an event published raw on a subject the
document names reaches the group that consumes it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from choreograph.cli import main
from choreograph.demo import create_app
from choreograph.demo.knobs import Knobs
from choreograph.envelope import decode
from choreograph.observe.asyncapi import asyncapi_document
from choreograph.runtime.runner import declare_groups
from choreograph.transport import transport_from_url
from tests.support.brokers import NATS, RABBITMQ, REDIS
from tests.support.commands import require_command
from tests.support.node import ASYNCAPI_VALIDATOR, node_project

DRONE = "choreograph.demo:create_app"


def validated(tmp_path: Path, *args: str, app: str = DRONE) -> dict[str, Any]:
    """The document the CLI writes for ``args``, once the official parser accepted it."""
    node = node_project(ASYNCAPI_VALIDATOR, "@asyncapi/parser")
    path = tmp_path / f"doc-{uuid.uuid4().hex[:6]}.json"
    result = CliRunner().invoke(main, ["asyncapi", app, "-o", str(path), *args])
    assert result.exit_code == 0, result.output
    checked = subprocess.run(
        [node, str(ASYNCAPI_VALIDATOR / "validate.mjs"), str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "valid AsyncAPI 3.0.0" in checked.stdout
    return dict(json.loads(path.read_text()))


def receives(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: op for k, op in doc["operations"].items() if op["action"] == "receive"}


def test_nats_document_names_subjects_streams_consumers_and_headers(tmp_path: Path) -> None:
    doc = validated(tmp_path, "--server", "nats://app:s3cret@nats-1:4222?namespace=drone")
    assert doc["servers"]["bus"] == {
        "host": "nats-1:4222", "protocol": "nats", "x-choreograph-namespace": "drone"
    }  # fmt: skip
    assert doc["channels"]["DeliveryRequested"]["address"] == "drone.ev.DeliveryRequested"
    assert (
        doc["channels"]["choreograph.HandlerFailed"]["address"]
        == "drone.ev.choreograph=2EHandlerFailed"
    )
    consumer = receives(doc)["package.receive.DeliveryRequested"]["x-choreograph-nats"]
    assert consumer == {
        "stream": "drone_events",
        "durable": "package~DeliveryRequested",
        "filter-subject": "drone.ev.DeliveryRequested",
        "ack-policy": "explicit",
        "deliver-policy": "new",
    }
    headers = doc["components"]["messages"]["DeliveryRequested"]["headers"]
    assert set(headers["properties"]) == {"Nats-Msg-Id"}
    assert "s3cret" not in json.dumps(doc)


def test_amqp_document_names_the_exchange_routing_keys_and_group_queues(tmp_path: Path) -> None:
    doc = validated(tmp_path, "--server", "amqp://guest:guest@rabbit:5672/prod?namespace=drone")
    channel = doc["channels"]["DeliveryRequested"]
    assert channel["address"] == "DeliveryRequested"
    exchange = channel["bindings"]["amqp"]["exchange"]
    assert exchange["name"] == "drone.events" and exchange["type"] == "topic"
    assert exchange["vhost"] == "prod"
    op = receives(doc)["package.receive.DeliveryRequested"]
    queue = doc["channels"]["group.package"]
    assert op["channel"] == {"$ref": "#/channels/group.package"}
    assert queue["address"] == "drone.g.package"
    assert queue["bindings"]["amqp"]["is"] == "queue"
    message = doc["components"]["messages"]["DeliveryRequested"]
    assert message["bindings"]["amqp"]["messageType"] == "DeliveryRequested"


def test_redis_document_names_group_streams_and_the_fan_out_set(tmp_path: Path) -> None:
    doc = validated(tmp_path, "--server", "redis://127.0.0.1:6379/0?namespace=drone")
    assert doc["channels"]["DeliveryRequested"]["address"] is None
    assert doc["channels"]["DeliveryRequested"]["x-choreograph-redis"] == {
        "groups-set": "{drone}:t:DeliveryRequested"
    }
    assert doc["channels"]["group.package"]["address"] == "{drone}:g:package"


def test_an_app_with_an_external_participant_validates_with_its_operations(
    tmp_path: Path,
) -> None:
    doc = validated(tmp_path, "--server", "nats://127.0.0.1:4222?namespace=shop",
                    app="tests.contracts.test_external:app")  # fmt: skip
    consumer = receives(doc)["billing.receive.OrderPlaced"]["x-choreograph-nats"]
    assert consumer["durable"] == "billing~OrderPlaced"
    assert doc["operations"]["billing.send.InvoiceIssued"]["action"] == "send"


def test_without_a_server_the_addresses_are_the_event_types_and_versions_are_named(
    tmp_path: Path,
) -> None:
    doc = validated(tmp_path)
    assert doc["channels"]["DeliveryRequested"]["address"] == "DeliveryRequested"
    message = doc["components"]["messages"]["DeliveryRequested"]
    assert message["x-choreograph-version"] == 1
    schema = message["payload"]["properties"]["dataschema"]
    assert schema["const"] == "urn:choreograph:DeliveryRequested:v1"


@pytest.mark.nats
async def test_the_drone_document_on_nats_matches_what_the_app_declares_on_the_server() -> None:
    NATS.require()
    import nats

    namespace = f"wire_{uuid.uuid4().hex[:8]}"
    url = f"nats://127.0.0.1:4222?namespace={namespace}"
    app = create_app(Knobs())
    doc = asyncapi_document(app, server=url)
    transport = transport_from_url(url)
    await transport.connect()
    client = await nats.connect("nats://127.0.0.1:4222")
    try:
        # given the app's groups declared on the server
        await declare_groups(transport, app)

        # then every receive operation names a durable consumer that exists, on its subject
        js = client.jetstream()
        stream = f"{namespace}_events"
        real = {c.name: c.config.filter_subject for c in await js.consumers_info(stream)}
        named = {
            op["x-choreograph-nats"]["durable"]: op["x-choreograph-nats"]["filter-subject"]
            for op in receives(doc).values()
        }
        assert named and named.items() <= real.items()
        for op in receives(doc).values():
            channel = op["channel"]["$ref"].rpartition("/")[2]
            assert doc["channels"][channel]["address"] == op["x-choreograph-nats"]["filter-subject"]

        # and an event published raw on the document's address, with its header, reaches the group
        body = json.dumps({
            "specversion": "1.0", "id": "raw-1", "source": "outside", "type": "DeliveryRequested",
            "datacontenttype": "application/json; charset=utf-8", "data": {"x": 1},
        }).encode()  # fmt: skip
        member = await transport.subscribe("package", ["DeliveryRequested"])
        address = doc["channels"]["DeliveryRequested"]["address"]
        await js.publish(address, body, headers={"Nats-Msg-Id": "raw-1"})
        got = []
        for _ in range(100):
            got += await member.receive(10, 1.0)
            if got:
                break
        (delivery,) = got
        assert delivery.message.topic == "DeliveryRequested" and delivery.message.id == "raw-1"
        assert decode(delivery.message.body).id == "raw-1"
        await member.ack(got)
        await member.close()
    finally:
        await client.close()
        with contextlib.suppress(Exception):
            await transport.delete_namespace()
        await transport.close()


@pytest.mark.redis
async def test_the_drone_document_on_redis_names_the_streams_and_sets_the_app_creates() -> None:
    REDIS.require()
    import redis.asyncio as redis

    namespace = f"wire_{uuid.uuid4().hex[:8]}"
    url = f"redis://127.0.0.1:6379/0?namespace={namespace}"
    app = create_app(Knobs())
    doc = asyncapi_document(app, server=url)
    transport = transport_from_url(url)
    await transport.connect()
    client = redis.Redis(host="127.0.0.1", port=6379, db=0)
    try:
        await declare_groups(transport, app)
        for op in receives(doc).values():
            channel = doc["channels"][op["channel"]["$ref"].rpartition("/")[2]]
            assert await client.type(channel["address"]) == b"stream", channel["address"]
        groups_set = doc["channels"]["DeliveryRequested"]["x-choreograph-redis"]["groups-set"]
        members = {m.decode() for m in await client.smembers(groups_set)}
        consumers = {
            op["tags"][0]["name"]
            for op in receives(doc).values()
            if op["messages"][0]["$ref"].endswith("/DeliveryRequested")
        }
        assert members == consumers and members
    finally:
        await client.aclose()
        with contextlib.suppress(Exception):
            await transport.delete_namespace()
        await transport.close()


@pytest.mark.rabbitmq
async def test_the_drone_document_on_rabbitmq_names_the_bindings_the_app_creates() -> None:
    RABBITMQ.require()
    require_command("rabbitmqctl")
    namespace = f"wire_{uuid.uuid4().hex[:8]}"
    url = f"amqp://guest:guest@127.0.0.1:5672/?namespace={namespace}"
    app = create_app(Knobs())
    doc = asyncapi_document(app, server=url)
    transport = transport_from_url(url)
    await transport.connect()
    groups = [*app.services]
    try:
        # given the app's groups declared on the broker
        await declare_groups(transport, app)
        listing = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "-q", "list_bindings", "source_name", "destination_name",
            "routing_key", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(listing.communicate(), 60)
        assert listing.returncode == 0
        listed = out.decode()
        real = {tuple(line.split("\t")) for line in listed.splitlines() if line.count("\t") == 2}

        # then each receive operation's queue is bound to the document's exchange with the
        # document's routing key (the topic channel's address)
        for op in receives(doc).values():
            queue = doc["channels"][op["channel"]["$ref"].rpartition("/")[2]]["address"]
            event = op["messages"][0]["$ref"].rpartition("/")[2]
            topic = doc["channels"][event]
            exchange = topic["bindings"]["amqp"]["exchange"]["name"]
            assert (exchange, queue, topic["address"]) in real, (exchange, queue, topic["address"])
    finally:
        with contextlib.suppress(Exception):
            await transport.delete_namespace(groups)  # type: ignore[call-arg]
        await transport.close()
