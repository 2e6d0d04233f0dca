"""Tracing across OS processes: the drone delivery on NATS, every service in its own
``choreograph run`` process, each writing its spans to a file; one trace per delivery, every
handling under the span that published its cause, the join linking both parts' publishers."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.drone.conftest import request_body
from tests.drone.test_on_brokers import SERVICES, delete_namespace
from tests.observe._span_file import SPAN_FILE_ENV
from tests.support.brokers import NATS
from tests.support.procs import Procs, free_port

pytestmark = [pytest.mark.nats, pytest.mark.slow]

APP = "choreograph.demo:create_app"
ASGI = "choreograph.demo.ingestion:create_http_app"
MIDDLEWARE = "tests.observe._span_file:factory"
KNOBS = {
    "DRONE_REJECTION_RATE": "0",
    "DRONE_TRANSIENT_ERROR_RATE": "0",
    "DRONE_FLIGHT_SECONDS": "0.1",
    "DRONE_JOIN_TIMEOUT": "30",
}
DELIVERIES = 3


async def wait_completed(base_url: str, ids: list[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    pending = set(ids)
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        while pending:
            for did in sorted(pending):
                response = await client.get(f"/api/deliveries/{did}")
                if response.status_code == 200 and response.json()["status"] == "completed":
                    pending.discard(did)
            if pending:
                assert time.monotonic() < deadline, f"not completed within {timeout}s: {pending}"
                await asyncio.sleep(0.1)


async def wait_every_service_handled(
    files: list[Path], ids: list[str], timeout: float = 30.0
) -> None:
    """Poll the span files until every service has a handling span of every delivery."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            spans = read_spans(files)
        except ValueError:  # a line half written: read again
            spans = []
        handled = defaultdict(set)
        for span in spans:
            if span["kind"] != "PRODUCER":
                attributes = span["attributes"]
                handled[attributes.get("choreograph.correlation_id")].add(
                    attributes.get("choreograph.service")
                )
        missing = {did: set(SERVICES) - handled[did] for did in ids if set(SERVICES) - handled[did]}
        if not missing:
            return
        assert time.monotonic() < deadline, f"no handling span within {timeout}s: {missing}"
        await asyncio.sleep(0.1)


def read_spans(files: list[Path]) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in files
        if path.exists()
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def publishers(spans: list[dict[str, Any]]) -> dict[str, str]:
    """Event id -> span id of the span that published it, found from the attributes only: an
    event sent from outside a handler has its PRODUCER span (``messaging.message.id``); one
    emitted by a handling has as causation id the event that handling handled, and its type is
    among that handling's ``choreograph.emitted`` (or that handling is the only one of it)."""
    sent = {
        s["attributes"]["messaging.message.id"]: s["span_id"]
        for s in spans
        if s["kind"] == "PRODUCER"
    }
    by_message: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in spans:
        if s["kind"] != "PRODUCER":
            by_message[s["attributes"]["messaging.message.id"]].append(s)
    found: dict[str, str] = {}
    for s in spans:
        if s["kind"] == "PRODUCER":
            continue
        attrs = s["attributes"]
        event_id, event_type = attrs["messaging.message.id"], attrs["messaging.destination.name"]
        cause = attrs.get("choreograph.causation_id")
        if cause is None or event_id in sent:
            assert event_id in sent, f"{s['name']}: no producer span for {event_id}"
            found[event_id] = sent[event_id]
            continue
        handled = by_message[cause]
        candidates = [
            c for c in handled if event_type in c["attributes"].get("choreograph.emitted", [])
        ] or (handled if len(handled) == 1 else [])  # emit_later is not in choreograph.emitted
        assert len(candidates) == 1, (s["name"], [c["name"] for c in handled])
        found[event_id] = candidates[0]["span_id"]
    return found


async def test_each_delivery_is_one_trace_across_processes(tmp_path: Path) -> None:
    # given every service in its own process on NATS, each writing its spans to its own file
    NATS.require()
    url = f"nats://127.0.0.1:4222?namespace=t{uuid.uuid4().hex[:12]}"
    stores = f"sqlite:///{tmp_path}/{{service}}.db"
    port = free_port()
    files = {name: tmp_path / f"spans-{name}.jsonl" for name in SERVICES}
    started = time.monotonic()
    try:
        with Procs(tmp_path / "logs", env=KNOBS) as procs:
            running = {
                name: procs.run(
                    APP,
                    name,
                    transport=url,
                    store=stores,
                    options=("--middleware", MIDDLEWARE),
                    env={SPAN_FILE_ENV: str(files[name])},
                    asgi=ASGI if name == "ingestion" else None,
                    port=port if name == "ingestion" else None,
                )
                for name in SERVICES
            }
            for name, proc in running.items():
                Procs.ready(proc, port if name == "ingestion" else None)

            # when deliveries are submitted over HTTP and complete
            base = f"http://127.0.0.1:{port}"
            bodies = [request_body(n) for n in range(DELIVERIES)]
            async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                for body in bodies:
                    response = await client.post("/api/deliveryrequests", json=body)
                    assert response.status_code == 202, response.text
            ids = [b["delivery_id"] for b in bodies]
            await wait_completed(base, ids)
            # and the trackers and notification have reacted to each terminal event
            await wait_every_service_handled(list(files.values()), ids)

            # and every process stops on SIGTERM
            for name, proc in running.items():
                code = proc.stop()
                assert code == 0, f"{name} exited with {code}:\n{proc.output()}"
    finally:
        await delete_namespace(url)

    # then the spans of each delivery form one trace, parent = publisher of the cause
    spans = read_spans(list(files.values()))
    published_by = publishers(spans)
    for did in ids:
        mine = [s for s in spans if s["attributes"].get("choreograph.correlation_id") == did]
        assert len({s["trace_id"] for s in mine}) == 1, [(s["name"], s["trace_id"]) for s in mine]
        handlings = [s for s in mine if s["kind"] != "PRODUCER"]
        services = {s["attributes"]["choreograph.service"] for s in handlings}
        assert set(SERVICES) <= services, services
        for span in handlings:
            event_id = span["attributes"]["messaging.message.id"]
            assert span["parent_span_id"] == published_by[event_id], span["name"]

        (join,) = [s for s in handlings if s["links"]]
        assert join["attributes"]["choreograph.service"] == "delivery"
        assert join["attributes"]["choreograph.handler"] == "schedule_delivery"
        by_id = {s["span_id"]: s for s in mine}
        linked = {link["span_id"] for link in join["links"]}
        assert linked == {
            published_by[link["attributes"]["messaging.message.id"]] for link in join["links"]
        }
        assert {by_id[s]["name"] for s in linked} == {
            "package process DeliveryRequested",
            "drone-scheduler process DeliveryRequested",
        }
        assert len({s["pid"] for s in mine}) >= 4, {s["pid"] for s in mine}
    pids = {s["pid"] for s in spans}
    assert len(pids) >= 4, pids
    print(f"{len(spans)} spans from {len(pids)} processes in {time.monotonic() - started:.1f}s")
