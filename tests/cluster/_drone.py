"""The drone delivery, one OS process per service, on a NATS cluster of the test's own: offered a
steady rate of deliveries over HTTP, watched through each process' journal (what it handled, when)
and through the services' stores (what they hold)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from choreograph.demo.inspect_state import Snapshot
from choreograph.transport import transport_from_url
from tests.drone.conftest import request_body
from tests.drone.processes import check_every_delivery_ended_cleanly, settled
from tests.support.nats_cluster import NatsCluster
from tests.support.procs import JOURNAL_ENV, Proc, Procs, read_journal

APP = "choreograph.demo:create_app"
ASGI = "choreograph.demo.ingestion:create_http_app"
SERVICES = ("ingestion", "package", "drone-scheduler", "delivery", "notification")
OUTCOME_SERVICE = "notification"
"""Its handlings mark the end of a delivery: their rate is the system's throughput."""


@dataclass
class DroneOnCluster:
    cluster: NatsCluster
    procs: Procs
    root: Path
    namespace: str
    port: int
    lease: float = 10.0
    procs_by_service: dict[str, Proc] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        # a generous publish_timeout: an outage of the cluster is waited out, not failed
        return self.cluster.transport_url(self.namespace, publish_timeout=120)

    @property
    def stores(self) -> str:
        return f"sqlite:///{self.root}/{{service}}.db"

    def journal(self, service: str) -> Path:
        return self.root / f"journal-{service}.log"

    # processes -----------------------------------------------------------------------------------

    def start(self, service: str) -> Proc:
        http = service == "ingestion"
        proc = self.procs.run(
            APP,
            service,
            transport=self.url,
            store=self.stores,
            lease=self.lease,
            asgi=ASGI if http else None,
            port=self.port if http else None,
            options=("--middleware", "tests.support.procs:journal"),
            env={JOURNAL_ENV: str(self.journal(service))},
        )
        self.procs_by_service[service] = proc
        return proc

    def start_all(self) -> None:
        for service in SERVICES:
            self.start(service)

    def wait_ready(self, timeout: float = 120.0) -> None:
        for service, proc in self.procs_by_service.items():
            Procs.ready(proc, self.port if service == "ingestion" else None, timeout)

    def crashed(self) -> dict[str, str]:
        """Processes that exited, with the end of their output."""
        return {
            service: proc.output()[-3000:]
            for service, proc in self.procs_by_service.items()
            if not proc.alive()
        }

    def all_running(self) -> bool:
        return all("running " in proc.output() for proc in self.procs_by_service.values())

    def met_an_outage(self) -> list[str]:
        """Services that logged a JetStream request they had to retry."""
        return [
            service
            for service, proc in self.procs_by_service.items()
            if "retrying in" in proc.output()
        ]

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every process; their exit codes."""
        return {service: proc.stop(30) for service, proc in self.procs_by_service.items()}

    # traffic ---------------------------------------------------------------------------------

    async def submit(self, count: int, rate: float, concurrency: int = 64) -> None:
        """POST ``count`` deliveries, one every ``1/rate`` seconds (not waiting for answers
        before sending the next, up to ``concurrency`` open requests)."""
        gate = asyncio.Semaphore(concurrency)
        start = time.monotonic()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=180) as cl:

            async def one(body: dict[str, Any]) -> None:
                async with gate:
                    response = await cl.post("/api/deliveryrequests", json=body)
                if response.status_code == 202:
                    self.submitted.append(body["delivery_id"])
                else:
                    self.refused.append(f"{response.status_code} {response.text[:200]}")

            tasks = []
            for number in range(count):
                await asyncio.sleep(max(0.0, start + number / rate - time.monotonic()))
                tasks.append(asyncio.create_task(one(request_body(number))))
            await asyncio.gather(*tasks)

    def outcome_times(self) -> list[float]:
        """When each delivery's outcome was handled by the outcome service (epoch seconds)."""
        return sorted(
            entry.at
            for entry in read_journal(self.journal(OUTCOME_SERVICE))
            if entry.kind == "end" and entry.outcome == "done"
        )

    def caught_up(self, at_least: int, rate: float) -> bool:
        """``at_least`` outcomes seen, and the outcomes of the last 3 s came at ``rate`` (within
        20%): the system keeps pace with what is offered."""
        outcomes = self.outcome_times()
        now = time.time()
        pace = throughput(outcomes, now - 3, now)
        return len(outcomes) >= at_least and 0.8 * rate <= pace <= 1.2 * rate

    def applied_twice(self) -> dict[tuple[str, str], int]:
        """(service, event id) handled to completion more than once."""
        done: Counter[tuple[str, str]] = Counter()
        for service in SERVICES:
            for entry in read_journal(self.journal(service)):
                if entry.kind == "end" and entry.outcome == "done":
                    done[(service, entry.event_id)] += 1
        return {key: n for key, n in done.items() if n > 1}

    # state -------------------------------------------------------------------------------------

    async def settled(self, timeout: float) -> Snapshot:
        """Wait until every accepted delivery ended and nothing is held; the last snapshot."""
        return await settled(self.stores, len(self.submitted), timeout)

    async def dead_letters(self) -> list[Any]:
        async with transport_from_url(self.url) as transport:
            return await transport.dead_letters(None, 10_000)

    async def delete_namespace(self) -> None:
        transport = transport_from_url(self.url)
        with contextlib.suppress(Exception):
            await transport.connect()
            await transport.delete_namespace()
        with contextlib.suppress(Exception):
            await transport.close()

    async def check_every_delivery_ended_cleanly(self, snap: Snapshot) -> None:
        """Every accepted delivery ended, the same way for every service that saw it, and
        nothing it held is left held."""
        assert not self.refused, f"{len(self.refused)} requests refused: {self.refused[:5]}"
        await check_every_delivery_ended_cleanly(self.stores, self.submitted, snap)


def recovery_seconds(
    outcomes: list[float], killed_at: float, baseline: float, window: float = 2.0
) -> float | None:
    """Seconds from ``killed_at`` until the throughput is back to 80% of ``baseline``: the end of
    the first ``window``-second window, wholly after the kill, holding at least 80% of the
    outcomes ``baseline`` (per second) would give. None if it never was (so the figure is at
    least ``window``, and errs on the long side)."""
    if baseline <= 0 or not outcomes:
        return None
    needed = 0.8 * baseline * window
    start = killed_at
    while start + window <= outcomes[-1] + 1e-9:
        if sum(start < at <= start + window for at in outcomes) >= needed:
            return start + window - killed_at
        start += 0.1
    return None


def throughput(outcomes: list[float], start: float, end: float) -> float:
    """Outcomes per second between ``start`` and ``end``."""
    if end <= start:
        return 0.0
    return sum(start <= at < end for at in outcomes) / (end - start)
