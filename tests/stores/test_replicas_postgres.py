"""Replicas racing on the same keys of one PostgreSQL store (per-key locking).

Store level: 2 and 4 store objects (as many replicas, each its own pool) run transactions on the
same documents, event ids and fleet at once. Runtime level: 2 and 4 runtimes of the demo's
drone-scheduler (and of a service counting in one document) share one bus and one schema, with
every event published twice. Each handling counts itself, so a double handling, a double
reservation or a lost update shows up as a wrong count.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from choreograph import (
    App,
    Context,
    DeadlineExpired,
    Event,
    Middleware,
    Outcome,
    Runtime,
    Service,
    WorkerSettings,
)
from choreograph.demo import drone_scheduler, tables
from choreograph.demo.events import DeliveryRequested
from choreograph.demo.knobs import Knobs
from choreograph.envelope import encode, new_envelope
from choreograph.store import DocumentBusy, Locks, Store, StoreTx, store_from_url
from choreograph.transport import Message
from choreograph.transports.memory import MemoryTransport
from tests.stores.conftest import PG_URL

pytestmark = pytest.mark.postgres

NOW = 1_000_000.0
REPLICAS = [pytest.param(2, id="2-replicas"), pytest.param(4, id="4-replicas")]


Replicas = Callable[[int], Awaitable[list[Store]]]


@pytest.fixture
async def open_replicas(pg_namespace: str) -> AsyncIterator[Replicas]:
    opened: list[Store] = []

    async def make(count: int) -> list[Store]:
        for _ in range(count):
            store = store_from_url(f"{PG_URL}?schema={pg_namespace}_{{service}}", "svc")
            await store.open()
            opened.append(store)
        return opened[-count:]

    yield make
    for store in opened:
        await store.close()


async def until_done(
    store: Store, work: Callable[[StoreTx], Awaitable[None]], locks: Locks = "raise"
) -> int:
    """Run ``work`` in a transaction as a worker does: when something is busy, roll back and
    run it again, first waiting for what was busy. Returns how many times it was handed back."""
    lock_first: list[tuple[str, str]] = []
    while True:
        try:
            async with store.transaction(locks=locks, lock_first=lock_first) as tx:
                await work(tx)
            return len(lock_first)
        except DocumentBusy as busy:
            lock_first.append(busy.lock)


# store level ---------------------------------------------------------------------------------


@pytest.mark.parametrize("replicas", REPLICAS)
@pytest.mark.parametrize("locks", ["wait", "raise"])
async def test_read_modify_write_by_many_replicas_loses_no_update(
    open_replicas: Replicas, replicas: int, locks: Locks
) -> None:
    stores = await open_replicas(replicas)

    async def increment(tx: StoreTx) -> None:
        doc = await tx.get("counter", "c") or {"n": 0}  # absent for the first ones
        await asyncio.sleep(random.uniform(0, 0.005))
        await tx.put("counter", "c", {"n": doc["n"] + 1})

    await asyncio.gather(*(until_done(stores[i % replicas], increment, locks) for i in range(40)))

    async with stores[0].transaction() as tx:
        assert await tx.get("counter", "c") == {"n": 40}


async def test_a_busy_document_raises_instead_of_waiting_and_is_free_after_the_commit(
    open_replicas: Replicas,
) -> None:
    first, second = await open_replicas(2)
    async with first.transaction() as holder:
        await holder.get("drone", "d1")  # absent, locked all the same
        async with second.transaction(locks="raise") as tx:
            with pytest.raises(DocumentBusy) as busy:
                await tx.put("drone", "d1", {"status": "reserved"})
            assert await tx.get("drone", "d2") is None  # other keys are not held
        await holder.put("drone", "d1", {"status": "free"})

    async with second.transaction(locks="raise", lock_first=[busy.value.lock]) as tx:
        assert await tx.get("drone", "d1") == {"status": "free"}


async def test_a_late_event_never_runs_beside_the_end_of_its_transaction(
    open_replicas: Replicas,
) -> None:
    """The terminal event of c1 is being handled: a replica checking whether c1 ended waits
    for it (here: is told it is busy), then sees it ended."""
    ending, late = await open_replicas(2)
    async with ending.transaction(locks="raise") as tx:
        await tx.end_transaction("c1", "DeliveryFailed", NOW)
        async with late.transaction(locks="raise") as other:
            with pytest.raises(DocumentBusy) as busy:
                await other.ended_transactions(["c0", "c1", "c2"])
            assert await other.ended_transactions(["c2"]) == {}  # other ids are not held

    async with late.transaction(locks="raise", lock_first=[busy.value.lock]) as other:
        assert await other.ended_transactions(["c0", "c1"]) == {"c1": "DeliveryFailed"}
        assert await other.transaction_ended("c1") == "DeliveryFailed"


@pytest.mark.parametrize("replicas", REPLICAS)
async def test_replicas_never_handle_one_event_twice(
    open_replicas: Replicas, replicas: int
) -> None:
    """Every replica gets every event, in its own order, in batches (as redeliveries do)."""
    stores = await open_replicas(replicas)
    events = [f"e{i:03}" for i in range(60)]

    async def replica(store: Store, seed: int) -> None:
        mine = random.Random(seed).sample(events, len(events))
        for start in range(0, len(mine), 20):
            batch = mine[start : start + 20]
            handed_back = batch

            async def handle(tx: StoreTx, batch: list[str] = batch) -> None:
                await tx.seen_many(batch)
                for event_id in batch:
                    if await tx.seen(event_id):
                        continue
                    await asyncio.sleep(0.001)
                    # a document of its own per handling: only the inbox keeps out a second one
                    await tx.put("handled", f"{event_id}/{uuid.uuid4()}", {"event": event_id})
                    await tx.remember(event_id, NOW)

            while handed_back:
                await until_done(store, handle)
                handed_back = []

    await asyncio.gather(*(replica(store, n) for n, store in enumerate(stores)))

    async with stores[0].transaction() as tx:
        handled = Counter(doc["event"] for _, doc in await tx.find("handled", limit=1000))
        assert handled == Counter(dict.fromkeys(events, 1))
        assert all([await tx.seen(event_id) for event_id in events])


@pytest.mark.parametrize("replicas", REPLICAS)
async def test_replicas_reserving_with_skip_locked_never_take_one_document_twice(
    open_replicas: Replicas, replicas: int
) -> None:
    stores = await open_replicas(replicas)
    async with stores[0].transaction() as tx:
        for i in range(20):
            await tx.put("drone", f"d{i:02}", {"status": "free"})
    orders = [f"o{i:02}" for i in range(30)]
    reserved: dict[str, str | None] = {}

    async def reserve(store: Store, order: str) -> None:
        async def work(tx: StoreTx) -> None:
            found = await tx.find("drone", {"status": "free"}, limit=1, skip_locked=True)
            reserved[order] = found[0][0] if found else None
            if found:
                await asyncio.sleep(random.uniform(0, 0.01))  # others reserve meanwhile
                await tx.put("drone", found[0][0], {"status": "reserved", "order": order})

        assert await until_done(store, work) == 0  # never waits for a drone: it skips it

    await asyncio.gather(*(reserve(stores[i % replicas], o) for i, o in enumerate(orders)))

    drones = [drone for drone in reserved.values() if drone is not None]
    assert sorted(drones) == [f"d{i:02}" for i in range(20)]  # each drone once
    async with stores[0].transaction() as tx:
        for order, drone in reserved.items():
            if drone is not None:
                assert await tx.get("drone", drone) == {"status": "reserved", "order": order}
        assert await tx.count("drone", {"status": "free"}) == 0


async def test_find_waits_for_a_held_match_and_checks_it_again(
    open_replicas: Replicas,
) -> None:
    first, second = await open_replicas(2)
    async with first.transaction() as tx:
        for key in ("d1", "d2"):
            await tx.put("drone", key, {"status": "free"})
    taking = asyncio.Event()

    async def take_d1() -> None:
        async with first.transaction() as tx:
            assert [k for k, _ in await tx.find("drone", {"status": "free"}, limit=1)] == ["d1"]
            taking.set()
            await asyncio.sleep(0.1)
            await tx.put("drone", "d1", {"status": "reserved"})

    async def find_free() -> list[str]:
        await taking.wait()
        async with second.transaction() as tx:  # waits for d1, then sees it is no longer free
            return [k for k, _ in await tx.find("drone", {"status": "free"}, limit=1)]

    _, found = await asyncio.gather(take_d1(), find_free())
    assert found == ["d2"]


# runtime level -------------------------------------------------------------------------------


class Handlings(Middleware):
    """What every replica handled (one instance shared by all of them)."""

    def __init__(self) -> None:
        self.kinds: Counter[tuple[str, str]] = Counter()

    def on_outcome(self, ctx: Context, outcome: Outcome) -> None:
        self.kinds[(ctx.event_id, outcome.kind)] += 1

    def of(self, kind: str) -> Counter[str]:
        return Counter({event_id: n for (event_id, k), n in self.kinds.items() if k == kind})


# Small batches and several lanes: many transactions of the service in flight at once.
SETTINGS = WorkerSettings(concurrency=2, batch_size=8, housekeeping_interval=0.02)


async def eventually(check: Callable[[], bool], within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def publish_twice(bus: MemoryTransport, events: list[tuple[Event, str]]) -> list[str]:
    """Publish each event twice under one id (a duplicate, as after a redelivery)."""
    ids = []
    for event, correlation_id in events:
        envelope = new_envelope(
            event.event_type, event.to_data(), source="test", correlation_id=correlation_id
        )
        message = Message(envelope.id, envelope.type, encode(envelope))
        await bus.publish([message, message])
        ids.append(envelope.id)
    return ids


@pytest.mark.parametrize("replicas", REPLICAS)
async def test_replicas_of_the_drone_scheduler_never_reserve_a_drone_twice(
    pg_namespace: str, replicas: int
) -> None:
    store = f"{PG_URL}?schema={pg_namespace}_{{service}}"
    knobs = Knobs(fleet_size=40, slow_drone_rate=0.0, transient_error_rate=0.0)
    app = App("drones", [drone_scheduler.build(knobs)])
    bus = MemoryTransport()
    seen = Handlings()
    runtimes = [
        Runtime(app, transport=bus, store=store, settings=SETTINGS, middleware=[seen])
        for _ in range(replicas)
    ]
    deliveries = [f"delivery-{i:02}" for i in range(30)]
    requests: list[tuple[Event, str]] = [
        (
            DeliveryRequested(
                delivery_id=delivery,
                owner_id="owner",
                pickup={"latitude": 47.6, "longitude": -122.3},
                dropoff={"latitude": 47.7, "longitude": -122.2},
                package={"package_id": f"p-{delivery}", "size": "small", "weight_kg": 1.0},
            ),
            delivery,
        )
        for delivery in deliveries
    ]
    for runtime in runtimes:
        await runtime.start()
    try:
        # when every request arrives twice, at replicas reserving at the same time
        ids = await publish_twice(bus, requests)
        await eventually(lambda: sum(seen.of("done").values()) >= len(ids))
        await eventually(lambda: sum(seen.kinds.values()) >= 2 * len(ids))

        # then each request was handled once, and its copy found to be a duplicate
        assert seen.of("done") == Counter(dict.fromkeys(ids, 1))
        assert seen.of("duplicate") == Counter(dict.fromkeys(ids, 1))
        async with runtimes[0].unit_of_work("drone-scheduler") as uow:
            fleet = await tables.drones(uow.session)
        # and each delivery holds one drone of its own (rows picked FOR UPDATE SKIP LOCKED)
        reserved = [drone["delivery"] for drone in fleet.values() if drone["status"] == "reserved"]
        assert sorted(reserved) == deliveries
    finally:
        await asyncio.gather(*(runtime.stop() for runtime in runtimes))


class Counted(Event):
    n: int


counter = Service("counter")


@counter.on(Counted)
async def count_in_one_document(event: Counted, ctx: Context) -> None:
    doc = await ctx.state.get("total", "all") or {"n": 0, "events": []}
    await asyncio.sleep(0.001)  # others read the same document meanwhile
    await ctx.state.put("total", "all", {"n": doc["n"] + 1, "events": [*doc["events"], event.n]})


@pytest.mark.parametrize("replicas", REPLICAS)
async def test_replicas_updating_one_document_lose_no_update(
    pg_namespace: str, replicas: int
) -> None:
    store = f"{PG_URL}?schema={pg_namespace}_{{service}}"
    bus = MemoryTransport()
    seen = Handlings()
    app = App("counting", [counter])
    runtimes = [
        Runtime(app, transport=bus, store=store, settings=SETTINGS, middleware=[seen])
        for _ in range(replicas)
    ]
    for runtime in runtimes:
        await runtime.start()
    try:
        ids = await publish_twice(bus, [(Counted(n=n), f"c{n}") for n in range(60)])
        await eventually(lambda: sum(seen.kinds.values()) >= 2 * len(ids))

        assert seen.of("done") == Counter(dict.fromkeys(ids, 1))
        async with runtimes[0].unit_of_work("counter") as uow:
            total = await uow.state.get("total", "all")
        assert total is not None
        assert total["n"] == 60
        assert sorted(total["events"]) == list(range(60))
    finally:
        await asyncio.gather(*(runtime.stop() for runtime in runtimes))


class Started(Event):
    n: int


class Finished(Event):
    n: int


watcher = Service("watcher")


@watcher.on(Started)
async def note_start(event: Started, ctx: Context) -> None:
    await ctx.state.put("started", ctx.correlation_id, {"n": event.n})


@watcher.deadline(starts_on=Started, expect=[Finished], within=0.2)
async def overdue(expired: DeadlineExpired, ctx: Context) -> None:
    doc = await ctx.state.get("overdue", "all") or {"keys": []}  # held by the test for a while
    await ctx.state.put("overdue", "all", {"keys": [*doc["keys"], expired.key]})


async def test_a_timer_whose_document_is_busy_fires_once_after_it_is_free(
    pg_namespace: str,
) -> None:
    store = f"{PG_URL}?schema={pg_namespace}_{{service}}"
    bus = MemoryTransport()
    app = App("watching", [watcher])
    runtimes = [Runtime(app, transport=bus, store=store, settings=SETTINGS) for _ in range(2)]
    for runtime in runtimes:
        await runtime.start()
    try:
        # given the document every expiry updates is held by another transaction
        async with runtimes[0].unit_of_work("watcher") as holder:
            await holder.state.get("overdue", "all")
            await publish_twice(bus, [(Started(n=n), f"k{n}") for n in range(5)])

            timers = runtimes[1].worker("watcher").store.list_timers
            deadline = time.monotonic() + 30
            # (pending, and due for a while: the timer loops find the document busy meanwhile)
            while len(due := await timers()) < 5 or max(t.due_at for t in due) > time.time() - 0.3:
                assert time.monotonic() < deadline, "the deadlines were never set"
                await asyncio.sleep(0.05)
            await holder.state.put("overdue", "all", {"keys": ["held"]})

        # when it is free, then each deadline fired once, after the holder's update
        async def fired() -> list[str]:
            async with runtimes[1].unit_of_work("watcher") as uow:
                doc = await uow.state.get("overdue", "all")
            return [] if doc is None else list(doc["keys"])

        deadline = time.monotonic() + 30
        while len(await fired()) < 6:
            assert time.monotonic() < deadline, f"not every deadline fired: {await fired()}"
            await asyncio.sleep(0.05)
        keys = await fired()
        assert keys[0] == "held"
        assert sorted(keys[1:]) == [f"k{n}" for n in range(5)]
    finally:
        await asyncio.gather(*(runtime.stop() for runtime in runtimes))
