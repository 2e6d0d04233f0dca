"""Helpers of the tests that run the drone delivery with each service in an OS process of its own
(on the embedded bus, a broker or a NATS cluster): submit requests over HTTP, wait until the
deliveries settled, read a service's documents, and check how every delivery ended, all through
the services' stores (``stores`` is their URL template, with ``{service}``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from choreograph.demo.inspect_state import Snapshot, snapshot
from choreograph.store import store_from_url
from tests.drone.conftest import request_body


async def submit(base_url: str, count: int, *, concurrency: int = 8) -> list[str]:
    """POST ``count`` valid delivery requests (``concurrency`` at a time), each answered 202;
    their delivery ids."""
    bodies = [request_body(n) for n in range(count)]
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=20) as client:

        async def one(body: dict[str, Any]) -> None:
            async with gate:
                response = await client.post("/api/deliveryrequests", json=body)
            assert response.status_code == 202, response.text

        await asyncio.gather(*(one(b) for b in bodies))
    return [b["delivery_id"] for b in bodies]


async def settled(stores: str, count: int, timeout: float) -> Snapshot:
    """Wait until ``count`` deliveries ended and nothing is held (``timeout`` guards a hang:
    then the last snapshot is returned as it is, for the caller's checks to say what is off)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = await snapshot(stores)
        done = snap.terminal >= count and not snap.drones_reserved
        if (done and not snap.packages_unreleased) or time.monotonic() > deadline:
            return snap
        await asyncio.sleep(0.25)


async def docs(stores: str, service: str, kind: str) -> dict[str, dict[str, Any]]:
    """Every document of ``kind`` in ``service``'s store, by key."""
    store = store_from_url(stores, service)
    await store.open()
    try:
        async with store.transaction() as tx:
            return dict(await tx.find(kind, limit=1_000_000))
    finally:
        await store.close()


def check_settled(snap: Snapshot, count: int) -> None:
    """``count`` deliveries ended, and nothing they held is left held."""
    assert snap.terminal == count, f"{count - snap.terminal} deliveries did not end: {snap}"
    assert snap.in_flight == 0, f"{snap.in_flight} deliveries still in flight: {snap}"
    assert snap.drones_reserved == 0, f"{snap.drones_reserved} drones left reserved: {snap}"
    assert snap.packages_unreleased == 0, (
        f"{snap.packages_unreleased} packages of ended deliveries still held ready: {snap}"
    )


async def check_every_delivery_ended_cleanly(stores: str, ids: list[str], snap: Snapshot) -> None:
    """Every delivery of ``ids`` ended, the same way for ingestion, delivery and notification,
    and nothing is left held."""
    check_settled(snap, len(ids))
    seen = await docs(stores, "ingestion", "delivery")
    decided = await docs(stores, "delivery", "delivery")
    told = await docs(stores, "notification", "sent")
    for did in ids:
        assert seen[did]["status"] in ("completed", "failed"), (did, seen[did])
        assert decided[did]["status"] == seen[did]["status"], (did, decided.get(did))
        assert told[did]["outcome"] == seen[did]["status"], (did, told.get(did))
