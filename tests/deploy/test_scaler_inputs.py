"""What KEDA's scalers read, read the same way on the real engines: with the service at zero
replicas the backlog of each consumer its ScaledObject names is the number of events published
for it; once one replica runs, the backlog drains to 0 and every event is handled.

* ``nats-jetstream``: ``GET /jsz?acc=<account>&consumers=true&config=true`` on the monitoring
  port; a consumer's lag is ``num_pending + num_ack_pending`` of its entry in
  ``account_details[].stream_detail[].consumer_detail[]`` (KEDA's pkg/scalers).
* ``rabbitmq`` (protocol amqp): the message count of a passive declare of the queue.
* ``redis-streams``: ``lag`` of the group in ``XINFO GROUPS`` (``lagCount``) and the count of
  ``XPENDING`` (``pendingEntriesCount``).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from choreograph.demo import create_app
from choreograph.demo.events import DeliveryCompleted, DeliveryFailed
from choreograph.events import Event
from choreograph.transport import transport_from_url
from tests.deploy.inspect_bus import amqp_queue_depth, namespace_of
from tests.deploy.support import handled, publish
from tests.deploy.test_manifests import MANIFESTS
from tests.support.brokers import BROKERS
from tests.support.nats_cluster import NATS_SERVER, require_nats_server
from tests.support.procs import JOURNAL_ENV, Procs, free_port, port_open, wait_until

DEMO = "choreograph.demo:create_app"
DEPLOY_DOC = MANIFESTS.parents[1] / "docs" / "deploy.md"
SERVICE = "notification"  # minReplicaCount 0 in its ScaledObject
COMPLETED, FAILED = 12, 7


def backlog_events() -> list[Event]:
    return [
        DeliveryCompleted(delivery_id=f"d{i}", drone_id="drone-1", package_id=f"p{i}")
        for i in range(COMPLETED)
    ] + [
        DeliveryFailed(delivery_id=f"f{i}", reason="no drone", stage="drone") for i in range(FAILED)
    ]


def documented_trigger(kind: str) -> dict[str, str]:
    """The metadata of the ``kind`` trigger docs/deploy.md shows (the RabbitMQ and Redis
    variants are in the docs only)."""
    for block in re.findall(r"```yaml\n(.*?)```", DEPLOY_DOC.read_text(), re.S):
        doc = yaml.safe_load(block)
        for trigger in doc.get("triggers") or doc.get("spec", {}).get("triggers") or []:
            if trigger["type"] == kind:
                return dict(trigger["metadata"])
    raise LookupError(f"docs/deploy.md shows no {kind} trigger")


def manifests_namespace() -> str:
    """The namespace of the transport URL the manifests give every service."""
    config = next(
        doc
        for doc in yaml.safe_load_all((MANIFESTS / "config.yaml").read_text())
        if doc and doc["metadata"]["name"] == "drone-config"
    )
    return namespace_of(config["data"]["CHOREOGRAPH_TRANSPORT"])


def scaled_object(service: str) -> dict[str, Any]:
    for doc in yaml.safe_load_all((MANIFESTS / "keda.yaml").read_text()):
        if doc and doc["metadata"]["name"] == service:
            return doc
    raise LookupError(service)


def declare_and_publish(procs: Procs, url: str, tmp_path: Path) -> None:
    declare = procs.start("declare", ["declare", "--app", DEMO, "--transport", url])
    assert declare.wait(120) == 0, declare.output()
    publish(url, backlog_events(), source="delivery")


def start_replica(procs: Procs, url: str, tmp_path: Path) -> Any:
    return procs.run(DEMO, SERVICE, transport=url, store=f"sqlite:///{tmp_path}/{{service}}.db",
                     options=["--middleware", "tests.support.procs:journal"],
                     env={JOURNAL_ENV: str(tmp_path / "journal.log")})  # fmt: skip


def all_handled(tmp_path: Path) -> bool:
    return len(handled(tmp_path / "journal.log", SERVICE)) == COMPLETED + FAILED


# NATS JetStream --------------------------------------------------------------------------------


@pytest.fixture
def nats_with_monitoring(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A nats-server of this test's own: (client port, monitoring port)."""
    require_nats_server()
    port, monitor = free_port(), free_port()
    log = (tmp_path / "nats.log").open("wb")
    server = subprocess.Popen(
        [
            NATS_SERVER,
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-js",
            "-m",
            str(monitor),
            "-sd",
            str(tmp_path / "nats-store"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: port_open(port) and port_open(monitor), 30, "nats-server to listen")
        yield port, monitor
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def jsz_lags(monitor: int, trigger: dict[str, str]) -> dict[str, int]:
    """Every consumer's lag in the trigger's stream, as KEDA's nats-jetstream scaler reads it."""
    query = f"acc={trigger['account']}&consumers=true&config=true".replace("$", "%24")
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/jsz?{query}", timeout=10) as answer:
        jsz = json.loads(answer.read())
    lags: dict[str, int] = {}
    for account in jsz.get("account_details") or []:
        for stream in account.get("stream_detail") or []:
            if stream["name"] == trigger["stream"]:
                for consumer in stream.get("consumer_detail") or []:
                    lags[consumer["name"]] = consumer["num_pending"] + consumer["num_ack_pending"]
    return lags


@pytest.mark.nats
def test_nats_jetstream_scaler_input(nats_with_monitoring: tuple[int, int], tmp_path: Path) -> None:
    port, monitor = nats_with_monitoring
    triggers = [t["metadata"] for t in scaled_object(SERVICE)["spec"]["triggers"]]
    url = f"nats://127.0.0.1:{port}?namespace={triggers[0]['stream'].removesuffix('_events')}"
    with Procs(tmp_path / "logs") as procs:
        # given the app declared and events published for notification, which runs no replica
        declare_and_publish(procs, url, tmp_path)
        # when the monitoring endpoint is read the way KEDA reads it
        lags = jsz_lags(monitor, triggers[0])
        # then each consumer of the ScaledObject exists and holds its backlog
        expected = {
            "notification~DeliveryCompleted": COMPLETED,
            "notification~DeliveryFailed": FAILED,
            "notification": 0,
        }
        assert {t["consumer"]: lags.get(t["consumer"]) for t in triggers} == expected
        # and so does every consumer every other ScaledObject names
        for doc in yaml.safe_load_all((MANIFESTS / "keda.yaml").read_text()):
            for trigger in doc["spec"]["triggers"]:
                assert trigger["metadata"]["consumer"] in lags
        # when one replica starts, the backlog drains to 0 and every event is handled
        replica = start_replica(procs, url, tmp_path)
        wait_until(lambda: all_handled(tmp_path), 90, "the replica to handle the backlog")
        wait_until(lambda: all(jsz_lags(monitor, t)[t["consumer"]] == 0 for t in triggers),
                   60, "every consumer's lag to reach 0")  # fmt: skip
        assert replica.stop() == 0, replica.output()


# RabbitMQ --------------------------------------------------------------------------------------


async def delete_namespace(url: str) -> None:
    transport = transport_from_url(url)
    async with transport:
        if url.startswith("amqp"):
            groups = list(create_app().services)
            await transport.delete_namespace(groups)  # type: ignore[call-arg]
        else:
            await transport.delete_namespace()


@pytest.mark.rabbitmq
def test_rabbitmq_scaler_input(namespace: str, tmp_path: Path) -> None:
    BROKERS["amqp"].require()
    url = f"amqp://guest:guest@127.0.0.1:5672/?namespace={namespace}"
    # the queue the documented rabbitmq trigger names is the transport's, in this test's namespace
    documented = documented_trigger("rabbitmq")
    in_manifests = transport_from_url(f"amqp://127.0.0.1/?namespace={manifests_namespace()}")
    assert documented["queueName"] == in_manifests.queue(SERVICE)  # type: ignore[attr-defined]
    queue = transport_from_url(url).queue(SERVICE)  # type: ignore[attr-defined]
    try:
        with Procs(tmp_path / "logs") as procs:
            # given events published for notification, which runs no replica
            declare_and_publish(procs, url, tmp_path)
            # when the queue depth is read as KEDA's rabbitmq scaler reads it over AMQP
            depth = asyncio.run(amqp_queue_depth(url, queue))
            # then it is the backlog
            assert depth == COMPLETED + FAILED
            # and once one replica runs it drains to 0 with every event handled
            replica = start_replica(procs, url, tmp_path)
            wait_until(lambda: all_handled(tmp_path), 90, "the replica to handle the backlog")
            wait_until(lambda: asyncio.run(amqp_queue_depth(url, queue)) == 0, 60,
                       "the queue to empty")  # fmt: skip
            assert replica.stop() == 0, replica.output()
    finally:
        asyncio.run(delete_namespace(url))


# Redis -----------------------------------------------------------------------------------------


async def redis_stream_inputs(url: str, stream: str, group: str) -> tuple[int, int]:
    """(lag from XINFO GROUPS, count from XPENDING) of ``group`` on ``stream``."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(url.split("?")[0])
    try:
        groups = {g["name"].decode(): g for g in await client.xinfo_groups(stream)}
        pending = await client.xpending(stream, group)
        return int(groups[group]["lag"]), int(pending["pending"])
    finally:
        await client.aclose()


@pytest.mark.redis
def test_redis_streams_scaler_input(namespace: str, tmp_path: Path) -> None:
    BROKERS["redis"].require()
    url = f"redis://127.0.0.1:6379/0?namespace={namespace}"
    # the stream and group the documented redis-streams trigger names are the transport's, in
    # this test's namespace
    documented = documented_trigger("redis-streams")
    in_manifests = transport_from_url(f"redis://127.0.0.1/0?namespace={manifests_namespace()}")
    assert documented["consumerGroup"] == SERVICE
    assert documented["stream"] == in_manifests._stream(SERVICE)  # type: ignore[attr-defined]
    stream = transport_from_url(url)._stream(SERVICE)  # type: ignore[attr-defined]
    try:
        with Procs(tmp_path / "logs") as procs:
            # given events published for notification, which runs no replica
            declare_and_publish(procs, url, tmp_path)
            # when the group is read as KEDA's redis-streams scaler reads it
            lag, pending = asyncio.run(redis_stream_inputs(url, stream, SERVICE))
            # then the lag is the backlog, none of it delivered yet
            assert (lag, pending) == (COMPLETED + FAILED, 0)
            # and once one replica runs both reach 0 with every event handled
            replica = start_replica(procs, url, tmp_path)
            wait_until(lambda: all_handled(tmp_path), 90, "the replica to handle the backlog")
            wait_until(lambda: asyncio.run(redis_stream_inputs(url, stream, SERVICE)) == (0, 0),
                       60, "the group's lag and pending entries to reach 0")  # fmt: skip
            assert replica.stop() == 0, replica.output()
    finally:
        asyncio.run(delete_namespace(url))
