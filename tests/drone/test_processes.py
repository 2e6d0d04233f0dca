"""The drone delivery as it runs for real: every service in its own OS process on one embedded
SQLite bus, submitted to over HTTP; processes killed, restarted; the demo command end to end."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from choreograph.demo.inspect_state import snapshot
from choreograph.transport import transport_from_url
from tests.drone.processes import check_every_delivery_ended_cleanly, docs, settled, submit
from tests.support.procs import Proc, Procs, choreograph_command, free_port

pytestmark = pytest.mark.slow

APP = "choreograph.demo:create_app"
CHAOS_APP = "tests.drone.chaos_app:create_app"
ASGI = "choreograph.demo.ingestion:create_http_app"
WORKERS = ("package", "drone-scheduler", "delivery", "notification")


@dataclass
class System:
    """The drone delivery, one process per service, on files under ``root``."""

    root: Path
    procs: Procs
    port: int
    app: str = APP

    @property
    def bus(self) -> str:
        return f"sqlite:///{self.root}/bus.db"

    @property
    def stores(self) -> str:
        return f"sqlite:///{self.root}/{{service}}.db"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, service: str, *, lease: float = 2.0, env: dict[str, str] | None = None,
              options: tuple[str, ...] = ()) -> Proc:  # fmt: skip
        http = service == "ingestion"
        return self.procs.run(
            self.app,
            service,
            transport=self.bus,
            store=self.stores,
            lease=lease,
            asgi=ASGI if http else None,
            port=self.port if http else None,
            options=options,
            env=env,
        )

    def start_all(self, **kwargs: Any) -> dict[str, Proc]:
        started = {name: self.start(name, **kwargs) for name in ("ingestion", *WORKERS)}
        for name, proc in started.items():
            Procs.ready(proc, self.port if name == "ingestion" else None)
        return started

    def queue(self, group: str) -> dict[str, int]:
        """How many of ``group``'s messages are held by a member, waiting for a retry, or ready."""
        now = time.time()
        with sqlite3.connect(self.root / "bus.db") as db:
            rows = db.execute(
                "SELECT leased, available_at > ? FROM choreograph_queue WHERE grp = ?",
                (now, group),
            ).fetchall()
        counts = {"held": 0, "delayed": 0, "ready": 0}
        for leased, later in rows:
            counts["held" if leased and later else "delayed" if later else "ready"] += 1
        return counts

    async def dead_letters(self) -> list[Any]:
        async with transport_from_url(self.bus) as transport:
            return await transport.dead_letters(None, 10_000)


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    with Procs(tmp_path / "logs", env={"DRONE_FLIGHT_SECONDS": "0.2"}) as procs:
        yield System(tmp_path, procs, free_port())


def stop_all(procs: dict[str, Proc]) -> None:
    for name, proc in procs.items():
        code = proc.stop()
        assert code == 0, f"{name} exited with {code}:\n{proc.output()}"
        assert "stopped cleanly" in proc.output(), name


# (a) -------------------------------------------------------------------------------------------


async def test_every_service_in_its_own_process_ends_every_delivery(system: System) -> None:
    # given five processes on one bus file, with the default failure knobs
    procs = system.start_all()
    # when
    ids = await submit(system.base_url, 50)
    snap = await settled(system.stores, 50, timeout=40)
    # then
    await check_every_delivery_ended_cleanly(system.stores, ids, snap)
    assert snap.statuses["completed"] > 0
    assert set(snap.failure_reasons) <= {"package rejected"}, snap.failure_reasons
    assert not await system.dead_letters()
    async with httpx.AsyncClient(base_url=system.base_url) as client:
        response = await client.get(f"/api/deliveries/{ids[0]}")
    assert response.json()["status"] in ("completed", "failed")
    stop_all(procs)


# (b) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["delivery", "package"])
async def test_a_worker_killed_mid_handler_loses_nothing(system: System, victim: str) -> None:
    # given the victim handles slowly (0.2 s a handler), in small batches, with a 2 s lease
    system.app = CHAOS_APP
    slow = {"DRONE_TEST_SLOW_SERVICES": victim, "DRONE_TEST_SLOW_SECONDS": "0.2"}
    procs = {name: system.start(name) for name in ("ingestion", *WORKERS) if name != victim}
    procs[victim] = system.start(victim, env=slow, options=("--batch-size", "3"))
    for name, proc in procs.items():
        Procs.ready(proc, system.port if name == "ingestion" else None)
    ids = await submit(system.base_url, 20)
    # when it is killed while it holds messages
    deadline = time.monotonic() + 10
    while system.queue(victim)["held"] == 0:
        assert time.monotonic() < deadline, "the victim never held a message"
        await asyncio.sleep(0.02)
    assert procs[victim].kill() == -9
    held = system.queue(victim)["held"]
    assert held > 0, "the kill came while messages were held"
    assert (await settled(system.stores, 20, timeout=1)).terminal < 20, "work was left to do"
    # and another process of that service starts
    procs[victim] = Procs.ready(system.start(victim))
    # then every delivery still ends, nothing held, nothing applied twice
    snap = await settled(system.stores, 20, timeout=40)
    await check_every_delivery_ended_cleanly(system.stores, ids, snap)
    assert not await system.dead_letters()
    procs.pop(victim).stop()
    stop_all(procs)


# (c) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
async def test_retries_pending_across_a_restart_of_everything_still_fire(
    system: System, how: str
) -> None:
    # given every first and second attempt of package and drone-scheduler fails, retried after 2 s
    system.app = CHAOS_APP
    system.procs.env.update(
        DRONE_TRANSIENT_ERROR_RATE="1",
        DRONE_REJECTION_RATE="0",
        DRONE_JOIN_TIMEOUT="60",
        DRONE_TEST_RETRY_DELAY="2",
    )
    procs = system.start_all()
    ids = await submit(system.base_url, 20)
    deadline = time.monotonic() + 10
    while min(system.queue(g)["delayed"] for g in ("package", "drone-scheduler")) < 20:
        assert time.monotonic() < deadline, "the retries were never scheduled"
        await asyncio.sleep(0.02)
    # when everything stops while the retries are pending
    for proc in procs.values():
        if how == "sigkill":
            proc.kill()
        else:
            assert proc.stop() == 0, proc.output()
    before = await snapshot(system.stores)
    assert before.statuses["completed"] == 0, before
    assert sum(system.queue("package").values()) == 20, "every request still waits for package"
    # and starts again
    procs = system.start_all()
    # then the retries fire (twice each) and every delivery completes
    snap = await settled(system.stores, 20, timeout=40)
    await check_every_delivery_ended_cleanly(system.stores, ids, snap)
    assert snap.statuses["completed"] == 20, snap
    assert not await system.dead_letters()
    stop_all(procs)


# (d) -------------------------------------------------------------------------------------------


def summary(output: str) -> dict[str, str]:
    """The rows of the demo's summary table: {'submitted': '200', 'completed': '190', ...}."""
    rows: dict[str, str] = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃|]", line) if cell.strip()]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


@pytest.mark.parametrize(
    ("knobs", "all_complete"),
    [((), False), (("--rejection-rate", "0", "--transient-error-rate", "0"), True)],
    ids=["default-knobs", "no-failures"],
)
async def test_the_demo_command_ends_every_delivery(
    tmp_path: Path, knobs: tuple[str, ...], all_complete: bool
) -> None:
    # given
    with Procs(tmp_path / "logs") as procs:
        # when
        demo = procs.start("demo", ["demo", "--data-dir", str(tmp_path / "demo"), *knobs])
        code = demo.wait(55)
    # then
    output = demo.output()
    assert code == 0, output
    assert "drone delivery: outcome" in output
    assert "every delivery ended; every drone is free; nothing is left held" in output
    # the hint to open the console names the command as it was typed, ready to paste
    assert f"{choreograph_command()[0]} console" in output
    # and so does the one to trace a delivery, which finds it where the demo recorded it
    hint = re.search(r"\(or (\S+) trace DELIVERY_ID --db (\S+)\)", " ".join(output.split()))
    assert hint is not None, output
    [delivery_id, *_] = await docs(
        f"sqlite:///{tmp_path}/demo/{{service}}.db", "ingestion", "delivery"
    )
    traced = await asyncio.to_thread(
        subprocess.run, [hint.group(1), "trace", delivery_id, "--db", hint.group(2)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert traced.returncode == 0, traced.stdout + traced.stderr
    assert "DeliveryRequested" in traced.stdout, traced.stdout
    rows = summary(output)
    assert rows["submitted"] == "200", rows
    assert int(rows["completed"]) + int(rows["failed and compensated"]) == 200, rows
    assert rows["still in flight"] == rows["drones still reserved"] == "0", rows
    assert rows["packages not released"] == "0", rows
    if all_complete:
        assert rows["completed"] == "200", rows
        assert rows["dead letters"] == "0", rows
    else:
        assert 0 < int(rows["failed and compensated"]) < 40, rows
