"""The drone delivery's own tables (SQLAlchemy), each service's in its own store.

package keeps its packages, drone-scheduler its fleet (a row per drone), ingestion the delivery
requests it accepted. Each set has its own ``MetaData``, declared on its service
(``Service(tables=...)``), so a service's store only ever holds its own tables. Handlers reach
them through ``ctx.session`` (and ingestion's web requests through ``uow.session``): rows commit
with the inbox record and the emitted events, or not at all.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, String, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ID = 64  # the longest id an event accepts (choreograph.demo.events.Id)


class PackageTables(DeclarativeBase):
    """package's tables."""


class Package(PackageTables):
    __tablename__ = "packages"

    package_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(String(ID), index=True)
    status: Mapped[str] = mapped_column(String(16))
    """ready, rejected, released (its delivery failed) or delivered."""
    weight_kg: Mapped[float]


class DroneTables(DeclarativeBase):
    """drone-scheduler's tables."""


class Drone(DroneTables):
    __tablename__ = "drones"

    drone_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    """free or reserved."""
    delivery_id: Mapped[str | None] = mapped_column(String(ID), index=True)
    """The delivery it is reserved for."""


class IngestionTables(DeclarativeBase):
    """ingestion's tables."""


class DeliveryRequestRow(IngestionTables):
    __tablename__ = "delivery_requests"

    delivery_id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(ID), index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The request as accepted (pickup, dropoff, package, expedited)."""


async def drones(session: AsyncSession) -> dict[str, dict[str, Any]]:
    """The fleet: ``{drone_id: {"status": ..., "delivery": delivery id or ""}}``."""
    rows = await session.execute(select(Drone.drone_id, Drone.status, Drone.delivery_id))
    return {d: {"status": status, "delivery": delivery or ""} for d, status, delivery in rows}


async def packages(
    session: AsyncSession, delivery_id: str | None = None
) -> dict[str, dict[str, Any]]:
    """``{package_id: {"delivery_id": ..., "status": ..., "weight_kg": ...}}`` (of one delivery,
    or all)."""
    query = select(Package)
    if delivery_id is not None:
        query = query.where(Package.delivery_id == delivery_id)
    return {
        p.package_id: {"delivery_id": p.delivery_id, "status": p.status, "weight_kg": p.weight_kg}
        for p in await session.scalars(query)
    }
