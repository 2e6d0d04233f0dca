"""The drone delivery on the broker servers: the demo end to end on NATS, RabbitMQ and Redis; and
on NATS every service in its own OS process, drone-scheduler twice, one replica SIGKILLed while it
holds messages and the other taking them over."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from rich.console import Console

from choreograph.demo import create_app, tables
from choreograph.demo.inspect_state import snapshot
from choreograph.demo.knobs import Knobs
from choreograph.demo.runner import isolated, run_demo
from choreograph.observe.recorder import RECORDER_GROUP
from choreograph.orm import session_on
from choreograph.store import store_from_url
from choreograph.transport import transport_from_url
from tests.drone.processes import check_every_delivery_ended_cleanly, check_settled, settled, submit
from tests.support.brokers import NATS, RABBITMQ, REDIS
from tests.support.commands import require_command
from tests.support.procs import (
    JOURNAL_ENV,
    JournalEntry,
    Proc,
    Procs,
    free_port,
    read_journal,
    unfinished,
)

pytestmark = pytest.mark.slow

SERVICES = tuple(create_app(Knobs()).services)
BASE_URLS = {
    "nats": "nats://127.0.0.1:4222",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/",
    "redis": "redis://127.0.0.1:6379/0",
}
BROKER = {"nats": NATS, "amqp": RABBITMQ, "redis": REDIS}


GROUPS = (*SERVICES, RECORDER_GROUP)
"""Every group the demo declares: its services' and, recording by default, the recorder's."""


async def delete_namespace(url: str, groups: Collection[str] = GROUPS) -> None:
    """Leave nothing of ``url``'s namespace on the shared broker. A fresh connection declared no
    group, so AMQP is told the groups (it cannot list queues: the recorder's too, which the demo
    makes by default); the others find everything."""
    transport = transport_from_url(url)
    try:
        await transport.connect()
        if url.startswith("amqp"):
            await transport.delete_namespace(groups)  # type: ignore[call-arg]
        else:
            await transport.delete_namespace()
    finally:
        with contextlib.suppress(Exception):
            await transport.close()


async def dead_letters(url: str) -> list[Any]:
    async with transport_from_url(url) as transport:
        return await transport.dead_letters(None, 10_000)


# 1. the demo end to end on each server transport -----------------------------------------------


@pytest.mark.parametrize(
    "transport",
    [
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("amqp", marks=pytest.mark.rabbitmq),
        pytest.param("redis", marks=pytest.mark.redis),
    ],
)
async def test_the_demo_ends_every_delivery_on_a_broker(tmp_path: Path, transport: str) -> None:
    # given a namespace of its own on the broker, and the default knobs (some packages rejected,
    # some first attempts failing transiently)
    BROKER[transport].require()
    url = isolated(BASE_URLS[transport])
    knobs = Knobs()
    assert knobs.rejection_rate > 0 and knobs.transient_error_rate > 0
    output = io.StringIO()
    try:
        # when 60 deliveries go through the whole choreography
        result = await run_demo(
            deliveries=60,
            knobs=knobs,
            transport_url=url,
            data_dir=tmp_path / "demo",
            timeout=40,
            console=Console(file=output, width=200),
        )
        # then every one of them ended, and nothing is left held
        snap = result.snapshot
        assert result.submitted == 60
        check_settled(snap, 60)
        assert snap.statuses["completed"] > 0, f"nothing completed: {snap}"
        assert set(snap.failure_reasons) <= {"package rejected"}, snap.failure_reasons
        assert result.dead_letters == 0, f"{result.dead_letters} dead letters"
        assert result.consistent, snap
    finally:
        await delete_namespace(url)
    # and nothing of its namespace is left on the shared broker
    assert await leftovers(transport, parse_qs(urlsplit(url).query)["namespace"][0]) == []


# 2. on NATS, one process per service, two drone-scheduler replicas, one killed --------------------

APP = "tests.drone.chaos_app:create_app"
ASGI = "choreograph.demo.ingestion:create_http_app"
SLOW = 0.05
"""Seconds each handling of drone-scheduler sleeps before it runs, so that a replica is killed
in the middle of a batch (messages it holds)."""
LEASE = 2.0
DELIVERIES = 80


HANG_GUARD = 60.0


def freeze(proc: Proc) -> float:
    """SIGSTOP ``proc``; returns a time by which it had certainly stopped (the kernel stops it
    within moments: its state in /proc turns to T)."""
    os.kill(proc.pid, signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    # the state is the field after the command name, which is in parentheses
    while stat.read_text().rpartition(")")[2].split()[0] != "T":
        time.sleep(0.0005)
    return time.time()


async def fleet_of(stores: str) -> dict[str, dict[str, Any]]:
    store = store_from_url(stores, "drone-scheduler")
    await store.open()
    try:
        async with store.transaction() as tx, session_on(tx) as session:
            return await tables.drones(session)
    finally:
        await store.close()


@pytest.mark.nats
async def test_a_killed_drone_scheduler_replica_is_taken_over_by_the_other(
    tmp_path: Path,
) -> None:
    # given every service in its own process on NATS, drone-scheduler twice (one store file),
    # every drone-scheduler handling slowed down, small batches, a 2 s lease
    NATS.require()
    url = f"nats://127.0.0.1:4222?namespace=t{uuid.uuid4().hex[:12]}"
    stores = f"sqlite:///{tmp_path}/{{service}}.db"
    port = free_port()
    journals = {name: tmp_path / f"journal-{name}.log" for name in ("a", "b")}
    knobs = {"DRONE_FLIGHT_SECONDS": "0.2", "DRONE_JOIN_TIMEOUT": "30"}
    submitting: asyncio.Task[list[str]] | None = None
    try:
        with Procs(tmp_path / "logs", env=knobs) as procs:

            def start(service: str, **kwargs: Any) -> Proc:
                return procs.run(APP, service, transport=url, store=stores, lease=LEASE, **kwargs)

            others = {
                "ingestion": start("ingestion", asgi=ASGI, port=port),
                **{name: start(name) for name in ("package", "delivery", "notification")},
            }
            replicas = {
                name: start(
                    "drone-scheduler",
                    options=("--batch-size", "3", "--middleware", "tests.support.procs:journal"),
                    env={
                        "DRONE_TEST_SLOW_SERVICES": "drone-scheduler",
                        "DRONE_TEST_SLOW_SECONDS": str(SLOW),
                        JOURNAL_ENV: str(journal),
                    },
                )
                for name, journal in journals.items()
            }
            for name, proc in others.items():
                Procs.ready(proc, port if name == "ingestion" else None)
            for proc in replicas.values():
                Procs.ready(proc)

            # when deliveries flow and a replica is SIGKILLed while it holds messages: frozen
            # (SIGSTOP) at a moment it is in the middle of a handling, else let go and tried
            # again (replicas sharing a SQLite file take turns unevenly)
            submitting = asyncio.create_task(submit(f"http://127.0.0.1:{port}", DELIVERIES))
            started = time.monotonic()
            deadline = started + HANG_GUARD
            victim = ""
            held: dict[str, JournalEntry] = {}
            while not held:
                assert time.monotonic() < deadline, "no replica was ever frozen in a handling"
                for proc in replicas.values():
                    assert proc.alive(), proc.output()
                entries = {name: read_journal(path) for name, path in journals.items()}
                if sum(e.kind == "start" for log in entries.values() for e in log) < 10:
                    await asyncio.sleep(0.002)
                    continue
                for name, proc in replicas.items():
                    frozen_by = freeze(proc)
                    # a handling started less than SLOW before the freeze is still asleep:
                    # its batch is certainly not settled (the journal's "end" comes after)
                    held = {
                        event_id: entry
                        for event_id, entry in unfinished(read_journal(journals[name])).items()
                        if entry.at > frozen_by - SLOW
                    }
                    if held:
                        victim = name
                        break
                    os.kill(proc.pid, signal.SIGCONT)
                else:
                    await asyncio.sleep(0.002)
            assert replicas[victim].kill() == -9
            survivor = next(name for name in replicas if name != victim)
            # (the snapshot after the submission: reading a store waits, event loop blocked, for
            # SQLite's write lock, which the replicas hold; HTTP connections would go stale)
            ids = await submitting
            early = await snapshot(stores)
            assert early.terminal < DELIVERIES, f"work was left to do: {early}"

            # then the other replica takes over what the victim held, and every delivery ends
            snap = await settled(stores, DELIVERIES, timeout=40)
            elapsed = time.monotonic() - started
            await check_every_delivery_ended_cleanly(stores, ids, snap)
            assert snap.statuses["completed"] > 0, f"nothing completed: {snap}"
            assert set(snap.failure_reasons) <= {"package rejected"}, snap.failure_reasons
            taken = {
                e.event_id: e
                for e in read_journal(journals[survivor])
                if e.kind == "end" and e.event_id in held
            }
            assert set(taken) == set(held), (
                f"held by the victim and never handled by the survivor: {set(held) - set(taken)}"
            )
            assert all(e.attempt >= 2 for e in taken.values()), taken
            drones = await fleet_of(stores)
            reserved = {k: d for k, d in drones.items() if d["status"] != "free"}
            assert not reserved, f"drones left reserved: {reserved}"
            assert not await dead_letters(url)
            print(
                f"{DELIVERIES} deliveries ended {elapsed:.1f}s after submission began; replica "
                f"{victim} killed holding {len(held)} messages, taken over; {snap.statuses}"
            )
            for name, proc in {**others, survivor: replicas[survivor]}.items():
                code = proc.stop()
                assert code == 0, f"{name} exited with {code}:\n{proc.output()}"
    finally:
        if submitting is not None and not submitting.done():
            submitting.cancel()
            with contextlib.suppress(BaseException):
                await submitting
        await delete_namespace(url)


# 1b. the demo leaves nothing on the broker ---------------------------------------------------


async def leftovers(transport: str, namespace: str) -> list[str]:
    """What the broker holds under ``namespace``: streams, queues and exchanges, or keys."""
    if transport == "nats":
        import nats

        nc = await nats.connect(BASE_URLS["nats"])
        try:
            streams = await nc.jetstream().streams_info()
        finally:
            await nc.close()
        return [s.config.name or "" for s in streams if (s.config.name or "").startswith(namespace)]
    if transport == "redis":
        from redis.asyncio import Redis

        client = Redis.from_url(BASE_URLS["redis"])
        try:
            return [k.decode() async for k in client.scan_iter(match=f"{{{namespace}}}*")]
        finally:
            await client.aclose()
    ctl = require_command("rabbitmqctl")
    names: list[str] = []
    for what in ("list_queues", "list_exchanges"):
        listed = await asyncio.to_thread(
            subprocess.run, [ctl, "-q", what, "name"], capture_output=True, text=True, check=True
        )
        names += [n for n in listed.stdout.split() if n.startswith(f"{namespace}.")]
    return names


@pytest.mark.parametrize(
    "transport",
    [
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("amqp", marks=pytest.mark.rabbitmq),
        pytest.param("redis", marks=pytest.mark.redis),
    ],
)
async def test_the_demo_deletes_its_namespace_at_the_end_unless_kept(
    tmp_path: Path, transport: str
) -> None:
    # given a broker
    BROKER[transport].require()
    results = []
    try:
        for keep in (False, True):
            # when the demo runs on it, with and without --keep
            result = await run_demo(
                deliveries=10,
                transport_url=BASE_URLS[transport],
                data_dir=tmp_path / f"demo-{keep}",
                timeout=40,
                console=Console(file=io.StringIO(), width=200),
                keep=keep,
            )
            results.append(result)
            assert result.consistent, result.snapshot
        namespaces = [parse_qs(urlsplit(r.transport_url).query)["namespace"][0] for r in results]
        # then the namespace of the run without --keep is gone, the kept one is still there
        assert results[0].deleted_namespace == namespaces[0]
        assert await leftovers(transport, namespaces[0]) == []
        assert results[1].deleted_namespace is None
        assert await leftovers(transport, namespaces[1]) != []
    finally:
        for result in results:
            await delete_namespace(result.transport_url)
