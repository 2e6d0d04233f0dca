"""The drone delivery, one process per service, on a 3-node NATS JetStream cluster (``replicas=3``)
while nodes are SIGKILLed and restarted: the stream's leader, a consumer's leader, the server most
clients are connected to, and a node while the services start.

Each run checks that every delivery ends the same way for every service, nothing stays reserved or
held, no event is applied twice (the journals), nothing is dead-lettered and no process crashes;
and prints, per kill, how long the throughput took to come back to 80% of what it was before
(``docs/transport-nats.md`` keeps the figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster._drone import DroneOnCluster, recovery_seconds, throughput
from tests.support.nats_cluster import NatsCluster
from tests.support.procs import Procs, free_port

pytestmark = [pytest.mark.nats, pytest.mark.slow, pytest.mark.timeout(300)]

KNOBS = {
    "DRONE_FLIGHT_SECONDS": "0.2",
    # long enough that a failover never fails a delivery by its join timeout
    "DRONE_JOIN_TIMEOUT": "60",
}
RATE = 8.0
"""Deliveries offered per second: well under what this loaded machine sustains, so that the
throughput measured is the offered rate, and a dip is the fault's."""
WARM_UP = 40
"""Outcomes seen before the first kill."""
BETWEEN = 40
"""Outcomes seen after a recovery before the next kill."""
BASELINE_SECONDS = 3.0
"""The throughput before a kill is measured over this many seconds (as `caught_up` checks it)."""


def _unique() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


async def _until(predicate: Callable[[], object], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        await asyncio.sleep(0.1)


def _victims(cluster: NatsCluster, system: DroneOnCluster) -> dict[str, Callable[[], str | None]]:
    stream = f"{system.namespace}_events"

    def consumer_leader() -> str | None:
        leaders = cluster.consumer_leaders(stream)
        return leaders.get("drone-scheduler~DeliveryRequested")

    def most_connected() -> str | None:
        counts = cluster.connections(f"choreograph-{system.namespace}")
        return max(counts, key=lambda node: counts[node]) if counts else None

    return {
        "stream leader": lambda: cluster.stream_leader(stream),
        "consumer leader": consumer_leader,
        "connected server": most_connected,
    }


async def _kill_and_recover(
    cluster: NatsCluster, system: DroneOnCluster, role: str, find: Callable[[], str | None]
) -> float:
    """SIGKILL the node ``find`` names, restart it once the cluster moved on, and wait until the
    throughput is back to 80% of what it was; returns how long that took after the kill."""
    victim = find()
    assert victim is not None, f"no {role} found"
    killed_at = time.time()
    baseline = throughput(system.outcome_times(), killed_at - BASELINE_SECONDS, killed_at)
    cluster.kill(victim)
    if role != "connected server":
        await _until(lambda: find() not in (None, victim), 60, f"a new {role} than {victim}")
    cluster.start_node(victim)
    await asyncio.to_thread(cluster.wait_ready)
    await _until(
        lambda: recovery_seconds(system.outcome_times(), killed_at, baseline) is not None,
        90,
        f"the throughput back after killing the {role}",
    )
    recovery = recovery_seconds(system.outcome_times(), killed_at, baseline)
    assert recovery is not None
    print(
        f"killed the {role} ({victim}) at {baseline:.1f} outcomes/s: back to 80% within "
        f"{recovery:.1f} s"
    )
    return recovery


async def test_every_delivery_ends_while_leaders_and_the_connected_server_are_killed(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    # given the drone delivery, one process per service, on the cluster with replicas=3,
    # offered a steady rate of deliveries
    with Procs(tmp_path / "logs", env=KNOBS) as procs:
        system = DroneOnCluster(nats_cluster, procs, tmp_path, _unique(), free_port())
        submitting: asyncio.Task[None] | None = None
        try:
            system.start_all()
            await asyncio.to_thread(system.wait_ready)
            submitting = asyncio.create_task(system.submit(int(RATE * 60), RATE))
            recoveries: dict[str, float] = {}
            for role, find in _victims(nats_cluster, system).items():
                # (killed once the system kept pace for a while: its throughput is the offered
                # rate, and a dip is the kill's)
                seen = WARM_UP + BETWEEN * len(recoveries)
                await _until(
                    lambda n=seen: system.caught_up(n, RATE),  # type: ignore[misc]
                    90,
                    f"{seen} outcomes, and the system keeping pace, before killing the {role}",
                )
                # when that node is SIGKILLed, and restarted once the cluster moved on,
                # then the throughput comes back and no process crashed
                recoveries[role] = await _kill_and_recover(nats_cluster, system, role, find)
                assert not system.crashed(), system.crashed()

            await submitting
            # and every delivery ends, cleanly, once
            snap = await system.settled(timeout=120)
            await system.check_every_delivery_ended_cleanly(snap)
            assert set(snap.failure_reasons) <= {"package rejected"}, snap.failure_reasons
            assert not system.applied_twice(), system.applied_twice()
            assert not await system.dead_letters()
            assert not system.crashed(), system.crashed()
            codes = system.stop_all()
            assert set(codes.values()) == {0}, codes
            print(f"{len(system.submitted)} deliveries: {dict(snap.statuses)}; {recoveries}")
        finally:
            if submitting is not None and not submitting.done():
                submitting.cancel()
                with contextlib.suppress(BaseException):
                    await submitting
            await system.delete_namespace()


async def test_a_node_killed_while_the_services_start_stops_nothing(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    # given the services starting, one process each, on the cluster
    with Procs(tmp_path / "logs", env=KNOBS) as procs:
        system = DroneOnCluster(nats_cluster, procs, tmp_path, _unique(), free_port())
        stream = f"{system.namespace}_events"
        try:
            system.start_all()
            # when the JetStream meta leader (which creates every consumer) is SIGKILLed while
            # they declare their consumers
            await _until(
                lambda: nats_cluster.consumer_leaders(stream) or system.crashed(),
                60,
                "a first consumer declared",
            )
            victim = nats_cluster.meta_leader()
            assert victim is not None
            nats_cluster.kill(victim)
            # and restarted once a service met the outage (or every one got through it)
            await _until(
                lambda: system.crashed() or system.met_an_outage() or system.all_running(),
                60,
                "a service to meet the outage",
            )
            met = system.met_an_outage()
            nats_cluster.start_node(victim)
            await asyncio.to_thread(nats_cluster.wait_ready)

            # then every service starts, none crashed, and deliveries flow end to end
            await asyncio.to_thread(system.wait_ready)
            assert not system.crashed(), system.crashed()
            await system.submit(int(RATE * 12), RATE)
            snap = await system.settled(timeout=120)
            await system.check_every_delivery_ended_cleanly(snap)
            assert set(snap.failure_reasons) <= {"package rejected"}, snap.failure_reasons
            assert not system.applied_twice(), system.applied_twice()
            codes = system.stop_all()
            assert set(codes.values()) == {0}, codes
            print(f"killed {victim} during start-up; retried and logged by: {met}")
        finally:
            await system.delete_namespace()
