"""Read the services' stores to check the system's invariants (for the demo, tests and benches).

This is an operator's view across databases, never used by a service: services only know their
own store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from choreograph.demo.tables import DroneTables, PackageTables, drones, packages
from choreograph.orm import create_tables, session_on
from choreograph.store import Store, StoreTx, store_from_url


@dataclass
class Snapshot:
    statuses: Counter[str] = field(default_factory=Counter)
    failure_reasons: Counter[str] = field(default_factory=Counter)
    drones_reserved: int = 0
    packages: Counter[str] = field(default_factory=Counter)

    @property
    def terminal(self) -> int:
        return self.statuses["completed"] + self.statuses["failed"]

    @property
    def in_flight(self) -> int:
        return sum(self.statuses.values()) - self.terminal

    def minus(self, earlier: Snapshot) -> Snapshot:
        """The deliveries that ended since ``earlier`` (what is held stays absolute)."""
        return Snapshot(
            self.statuses - earlier.statuses,
            self.failure_reasons - earlier.failure_reasons,
            self.drones_reserved,
            self.packages,
        )

    @property
    def packages_unreleased(self) -> int:
        """Packages still held ready although their delivery ended."""
        return self.packages["ready"]


SERVICES = ("ingestion", "drone-scheduler", "package")
"""The stores a snapshot reads."""


async def snapshot(store_url: str) -> Snapshot:
    """Open the stores ``store_url`` names (a template with ``{service}``), read, close them."""
    stores = {service: store_from_url(store_url, service) for service in SERVICES}
    opened: list[Store] = []
    try:
        for store in stores.values():
            await store.open()
            opened.append(store)
        return await read_snapshot(stores)
    finally:
        for store in opened:
            await store.close()


async def read_snapshot(stores: Mapping[str, Store]) -> Snapshot:
    """Read a snapshot from stores already open (one per name of :data:`SERVICES`)."""
    snap = Snapshot()
    for service, reader in (
        ("ingestion", _read_ingestion),
        ("drone-scheduler", _read_drones),
        ("package", _read_packages),
    ):
        async with stores[service].transaction() as tx:
            await reader(tx, snap)
    return snap


async def _read_ingestion(tx: StoreTx, snap: Snapshot) -> None:
    for _, doc in await tx.find("delivery", limit=10_000_000):
        snap.statuses[doc["status"]] += 1
        if doc["status"] == "failed":
            snap.failure_reasons[reason_kind(doc.get("reason", ""))] += 1


async def _read_drones(tx: StoreTx, snap: Snapshot) -> None:
    await create_tables(tx, DroneTables.metadata)  # (a store read before its service ran)
    async with session_on(tx) as session:
        fleet = await drones(session)
    snap.drones_reserved = sum(drone["status"] == "reserved" for drone in fleet.values())


async def _read_packages(tx: StoreTx, snap: Snapshot) -> None:
    await create_tables(tx, PackageTables.metadata)
    async with session_on(tx) as session:
        for package in (await packages(session)).values():
            snap.packages[package["status"]] += 1


def reason_kind(reason: str) -> str:
    """'package rejected: too heavy' -> 'package rejected'."""
    return reason.split(":", 1)[0] if reason else "unknown"
