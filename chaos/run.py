"""One chaos run: submit deliveries over HTTP at a steady pace while members are killed (and, on
NATS, cluster nodes), publish poison beside them, wait until every accepted delivery ended, then
account for everything. Bounded in count and time: it stops by itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from chaos.ledger import Ledger, read_ledger
from chaos.poison import CATALOGUE, Published, publish_poison
from chaos.system import Readers, System
from choreograph.demo.inspect_state import Snapshot
from choreograph.demo.runner import sample_request
from choreograph.errors import TransportError
from choreograph.transport import DeadLetter, transport_from_url
from tests.support.procs import Procs

if TYPE_CHECKING:
    from tests.support.nats_cluster import NatsCluster

log = logging.getLogger("chaos")

READ_TIMEOUT = 60.0
"""Longest wait for one read of the stores or the dead letters."""
POISON_GROUPS = {"package", "drone-scheduler", "delivery"}
"""Every group that consumes the poison's topic (DeliveryRequested)."""


@dataclass(frozen=True)
class ChaosConfig:
    configuration: str = "sqlite"
    deliveries: int = 2000
    rate: float = 25.0
    """Deliveries submitted per second."""
    kills: int = 10
    """Members killed with SIGKILL (restarted after ``pause`` seconds)."""
    node_kills: int = 0
    """Cluster nodes killed with SIGKILL (NATS only; restarted after ``node_pause`` seconds)."""
    poison_rounds: int = 3
    """Rounds of malformed messages (one of each kind per round)."""
    skip_poison: tuple[str, ...] = ()
    """Kinds of poison left out (names from ``chaos.poison.CATALOGUE``)."""
    pause: tuple[float, float] = (0.5, 2.0)
    node_pause: tuple[float, float] = (3.0, 6.0)
    stall_seconds: float = 90.0
    """No delivery ending for this long, while some have not ended, is a stall."""
    timeout: float = 0.0
    """Overall bound in seconds (0: derived from the deliveries and the rate)."""
    seed: int = 0
    lease: float = 3.0

    @property
    def bound(self) -> float:
        return self.timeout or 240.0 + 3 * self.deliveries / self.rate


@dataclass
class Kill:
    at: float
    target: str
    kind: str
    """``member`` or ``node``."""


@dataclass
class ChaosResult:
    config: ChaosConfig
    submitted: int = 0
    accepted: set[str] = field(default_factory=set)
    refused: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, str] = field(default_factory=dict)
    snapshot: Snapshot = field(default_factory=Snapshot)
    ledger: Ledger = field(default_factory=Ledger)
    dead_letters: Counter[str] = field(default_factory=Counter)
    poison_dead: Counter[str] = field(default_factory=Counter)
    other_dead: Counter[str] = field(default_factory=Counter)
    """Dead letters of valid traffic, by ``group: topic: reason``."""
    poison: list[Published] = field(default_factory=list)
    poison_unaccounted: list[Published] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    samples: list[tuple[float, int]] = field(default_factory=list)
    unexpected_exits: list[tuple[str, int]] = field(default_factory=list)
    unclean_stops: list[tuple[str, int]] = field(default_factory=list)
    failed_starts: list[tuple[str, str]] = field(default_factory=list)
    tracebacks: dict[str, int] = field(default_factory=dict)
    stalled: str = ""
    started: float = 0.0
    ended: float = 0.0

    @property
    def terminal(self) -> int:
        return sum(1 for s in self.statuses.values() if s in ("completed", "failed"))

    @property
    def lost(self) -> int:
        return len(self.accepted) - self.terminal

    @property
    def held(self) -> int:
        return self.snapshot.drones_reserved + self.snapshot.packages_unreleased

    @property
    def crashes(self) -> int:
        return len(self.unexpected_exits) + len(self.unclean_stops) + len(self.failed_starts)


async def run_chaos(config: ChaosConfig, root: Path, transport_url: str, store_url: str,
                    cluster: NatsCluster | None = None) -> ChaosResult:  # fmt: skip
    """Run the system under ``root`` on the given bus and stores (``cluster``: the NatsCluster
    whose nodes may be killed) and return the accounting."""
    rng = random.Random(config.seed)
    result = ChaosResult(config)
    # a fleet that a steady 25 deliveries/s does not exhaust (the demo's other knobs as they are)
    knobs = {"DRONE_FLIGHT_SECONDS": "0.2", "DRONE_FLEET_SIZE": "200"}
    with Procs(root / "logs", env=knobs) as procs:
        system = System(root, procs, transport_url, store_url, lease=config.lease)
        await system.start_all()
        result.started = time.monotonic()
        deadline = result.started + config.bound
        window = config.deliveries / config.rate
        async with Readers(store_url, transport_url) as readers:
            sampler = asyncio.create_task(_sample(readers, result))
            chaos = [
                asyncio.create_task(_kill_members(system, config, rng, window, result)),
                asyncio.create_task(_kill_nodes(cluster, config, rng, window, result)),
                asyncio.create_task(_poison(transport_url, config, window, result)),
            ]
            try:
                async with asyncio.timeout_at(asyncio.get_running_loop().time() + config.bound):
                    await _submit(system, config, result, deadline)
                    await asyncio.gather(*chaos)
                    await _wait_settled(readers, result, config, deadline)
            except TimeoutError:
                result.stalled = f"the run did not end within its bound of {config.bound:.0f} s"
            finally:
                for task in [*chaos, sampler]:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            result.ended = time.monotonic()
            try:
                await _account(system, readers, result)
            except TimeoutError:
                result.stalled = result.stalled or "the outcome could not be read"
        result.unclean_stops = system.stop_all()
    return result


# the traffic ---------------------------------------------------------------------------------


async def _submit(
    system: System, config: ChaosConfig, result: ChaosResult, deadline: float
) -> None:
    """POST every delivery at ``rate`` per second; a refused or failed POST (ingestion killed) is
    sent again, with the same delivery id (so the POST is idempotent), until it is accepted."""
    gate = asyncio.Semaphore(32)
    start = time.monotonic()

    async with httpx.AsyncClient(base_url=system.base_url, timeout=10) as client:

        async def one(number: int) -> None:
            body = sample_request(number)
            async with gate:
                while time.monotonic() < deadline:
                    try:
                        response = await client.post("/api/deliveryrequests", json=body)
                    except httpx.HTTPError as exc:
                        result.refused[type(exc).__name__] += 1
                    else:
                        if response.status_code == 202:
                            result.accepted.add(str(body["delivery_id"]))
                            return
                        result.refused[f"HTTP {response.status_code}"] += 1
                    await asyncio.sleep(0.2)

        tasks = []
        for number in range(config.deliveries):
            await asyncio.sleep(max(0.0, start + number / config.rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(number)))
            result.submitted += 1
        await asyncio.gather(*tasks)


async def _kill_members(system: System, config: ChaosConfig, rng: random.Random, window: float,
                        result: ChaosResult) -> None:  # fmt: skip
    members = list(system.members.values())
    times = sorted(rng.uniform(1.0, max(window, 2.0)) for _ in range(config.kills))
    start = time.monotonic()
    for at in times:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        member = rng.choice(members)
        system.kill(member)
        result.kills.append(Kill(time.monotonic(), member.name, "member"))
        log.info("killed %s", member.name)
        await asyncio.sleep(rng.uniform(*config.pause))
        await system.launch(member)


async def _kill_nodes(cluster: NatsCluster | None, config: ChaosConfig, rng: random.Random,
                      window: float, result: ChaosResult) -> None:  # fmt: skip
    if cluster is None or not config.node_kills:
        return
    times = sorted(rng.uniform(2.0, max(window, 3.0)) for _ in range(config.node_kills))
    start = time.monotonic()
    for at in times:
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        name = rng.choice(sorted(cluster.nodes))
        await asyncio.to_thread(cluster.kill, name)  # (waits for the process: not on the loop)
        result.kills.append(Kill(time.monotonic(), name, "node"))
        log.info("killed node %s", name)
        await asyncio.sleep(rng.uniform(*config.node_pause))
        await asyncio.to_thread(cluster.start_node, name)
        await asyncio.to_thread(cluster.wait_ready, 120.0)


async def _poison(transport_url: str, config: ChaosConfig, window: float,
                  result: ChaosResult) -> None:  # fmt: skip
    """Publish every kind of poison ``poison_rounds`` times, spread over the run, through a
    connection of its own (a foreign producer)."""
    if not config.poison_rounds:
        return
    start = time.monotonic()
    async with transport_from_url(transport_url) as producer:
        for round_number in range(config.poison_rounds):
            at = window * (round_number + 0.5) / config.poison_rounds
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            for attempt in range(20):  # the bus may be failing over
                try:
                    sent = await publish_poison(producer, round_number, config.skip_poison)
                    result.poison += sent
                    break
                except TransportError as exc:
                    log.warning("publishing poison failed (%s); again", exc)
                    await asyncio.sleep(0.5 * (attempt + 1))


# waiting and measuring ---------------------------------------------------------------------------


async def _sample(readers: Readers, result: ChaosResult) -> None:
    while True:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                result.samples.append((time.monotonic(), await readers.terminal()))
        await asyncio.sleep(0.5)


async def _wait_settled(readers: Readers, result: ChaosResult, config: ChaosConfig,
                        deadline: float) -> None:  # fmt: skip
    """Until every accepted delivery ended, nothing is held and every poison message is
    dead-lettered by every group of its topic; or until none of that changed for
    ``stall_seconds`` (a stall when deliveries or poison are stuck; resources still held are
    reported as such), or the overall bound passed."""
    last: tuple[int, int, int] | None = None
    changed = time.monotonic()
    while True:
        with contextlib.suppress(TimeoutError):  # a store or the bus failing over: next round
            async with asyncio.timeout(READ_TIMEOUT):
                result.statuses = await readers.statuses(result.accepted)
                if result.lost == 0:
                    result.snapshot = await readers.snapshot()
                    _count_dead_letters(result, await readers.dead_letters())
                    if result.held == 0 and not result.poison_unaccounted:
                        return
        now = time.monotonic()
        state = (result.terminal, result.held, len(result.poison_unaccounted))
        if state != last:
            last, changed = state, now
        if now > deadline:
            result.stalled = f"not settled within the run's bound of {config.bound:.0f} s"
            return
        if now - changed > config.stall_seconds:
            quiet = f"for {config.stall_seconds:.0f} s"
            if result.lost:
                result.stalled = f"no delivery ended {quiet}"
            elif result.poison_unaccounted:
                stuck = len(result.poison_unaccounted)
                result.stalled = f"{stuck} poison messages not dead-lettered by every group {quiet}"
            return  # (resources still held: reported as held)
        await asyncio.sleep(1.0)


async def _account(system: System, readers: Readers, result: ChaosResult) -> None:
    result.unexpected_exits = system.unexpected_exits()
    result.failed_starts = list(system.failed_starts)
    result.tracebacks = system.tracebacks()
    result.ledger = read_ledger(system.journals())
    async with asyncio.timeout(3 * READ_TIMEOUT):
        result.statuses = await readers.statuses(result.accepted)
        result.snapshot = await readers.snapshot()
        _count_dead_letters(result, await readers.dead_letters())


def _count_dead_letters(result: ChaosResult, dead_letters: list[DeadLetter]) -> None:
    """Dead letters by reason; a poison message is accounted for once every group of its topic
    dead-lettered it."""
    poison_ids = {p.event_id: p.kind for p in result.poison}
    groups: defaultdict[str, set[str]] = defaultdict(set)
    result.dead_letters.clear()
    result.poison_dead.clear()
    result.other_dead.clear()
    for dead in dead_letters:
        result.dead_letters[dead.failure.reason] += 1
        kind = poison_ids.get(dead.message.id)
        if kind is not None:
            result.poison_dead[kind] += 1
            groups[dead.message.id].add(dead.group)
        else:
            result.other_dead[f"{dead.group}: {dead.message.topic}: {dead.failure.reason}"] += 1
    result.poison_unaccounted = [
        p for p in result.poison if not p.refused and groups[p.event_id] < POISON_GROUPS
    ]


def recovery_times(result: ChaosResult, *, before: float = 5.0, window: float = 2.0,
                   share: float = 0.8) -> list[float | None]:  # fmt: skip
    """For each kill: seconds until deliveries ended again at ``share`` of the rate of the
    ``before`` seconds before it (over ``window`` seconds), or until all had ended; None when
    the rate before was too low to tell, or it never came back."""
    samples = result.samples
    if not samples:
        return []
    total = len(result.accepted)

    def count_at(t: float) -> int:
        last = 0
        for at, count in samples:
            if at > t:
                break
            last = count
        return last

    times: list[float | None] = []
    for kill in result.kills:
        rate_before = (count_at(kill.at) - count_at(kill.at - before)) / before
        if rate_before < 1.0:
            times.append(None)
            continue
        recovered = None
        for at, count in samples:
            if at < kill.at:
                continue
            if count >= total or (count_at(at + window) - count) / window >= share * rate_before:
                recovered = at - kill.at
                break
        times.append(recovered)
    return times


__all__ = ["CATALOGUE", "ChaosConfig", "ChaosResult", "recovery_times", "run_chaos"]
