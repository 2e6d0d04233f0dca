"""The sqlite bus' doorbell: a publish in one process wakes the members of another at once."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from choreograph.transport import Message
from choreograph.transports._doorbell import Doorbell
from choreograph.transports.sqlite import SqliteSettings, SqliteTransport

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="abstract Unix sockets are Linux's"
)


async def test_a_ring_reaches_every_other_listener_of_the_file(tmp_path: Path) -> None:
    bus = str(tmp_path / "bus.db")
    rung = asyncio.Event()
    listener, ringer = Doorbell(bus), Doorbell(bus)
    listener.listen(rung.set)
    try:
        ringer.ring()
        async with asyncio.timeout(10):  # hang guard
            await rung.wait()
    finally:
        listener.close()
        ringer.close()
    # closing removed the markers, and the last one the directory
    assert not (tmp_path / "bus.db.wake").exists()


async def test_a_marker_nobody_listens_on_is_removed_by_a_ring(tmp_path: Path) -> None:
    bus = str(tmp_path / "bus.db")
    (tmp_path / "bus.db.wake").mkdir()
    (tmp_path / "bus.db.wake" / "1-gone").touch()
    Doorbell(bus).ring()
    assert list((tmp_path / "bus.db.wake").iterdir()) == []


async def test_a_publish_wakes_a_member_of_another_bus_object_long_before_its_poll(
    tmp_path: Path,
) -> None:
    # given a member polling only every 10 s, on its own connection to the file
    path = str(tmp_path / "bus.db")
    url = f"sqlite:///{path}"
    consumer = SqliteTransport(
        SqliteSettings.from_url(f"{url}?poll_interval=10&min_poll_interval=10")
    )
    producer = SqliteTransport(SqliteSettings.from_url(url))
    await consumer.connect()
    await producer.connect()
    try:
        sub = await consumer.subscribe("g", ["T"])
        assert await sub.receive(10, 0.01) == []  # it has looked once, and now waits
        waiting = asyncio.create_task(sub.receive(10, 120.0))
        await asyncio.sleep(0)
        # when another connection publishes
        await producer.publish([Message("m1", "T", b"{}")])
        # then the member has it without waiting for its next poll (in ms; the guard is below
        # the poll only so that a missing wake-up fails here)
        async with asyncio.timeout(8):
            got = await waiting
        assert [d.message.id for d in got] == ["m1"]
        await sub.ack(got)
    finally:
        await producer.close()
        await consumer.close()
