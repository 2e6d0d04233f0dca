"""A receive can always be stopped: cancelled or closed, it ends, and loses nothing.

Loops that end only by cancellation (the recorder, a worker's housekeeping) hang forever if a
transport lets a cancellation get lost underneath (Python 3.11's ``asyncio.wait_for`` does, see
``choreograph/_cancel.py``).
"""

from __future__ import annotations

import asyncio

from choreograph.transport import Delivery, Subscription
from tests.conformance._helpers import ids, message, receive_acking, receive_n, unique
from tests.conftest import TransportFactory

HANG_GUARD = 30.0
"""Seconds a stopped receive may take before the test calls it a hang (it only guards hangs)."""
CANCEL_POINTS = 60
LEASE = 2.0


async def receive_until_cancelled(sub: Subscription, got: list[Delivery]) -> None:
    """Receive in a loop with short waits and nothing else to stop it, like the recorder."""
    while True:
        got += await sub.receive(10, 0.05)


async def test_a_receiving_loop_ends_when_cancelled_at_any_point_and_loses_nothing(
    make_transport: TransportFactory,
) -> None:
    # given member A receiving in a loop that only a cancellation stops, under a short lease
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    a = await (await make_transport()).subscribe(group, [topic], lease=LEASE)
    sent = []
    received: list[Delivery] = []

    # when the loop is cancelled many times, each time at a different point of its receive
    # (after 0, 1, 2... turns of the event loop), with a message published just before
    ended_cancelled = []
    for turns in range(CANCEL_POINTS):
        loop = asyncio.create_task(receive_until_cancelled(a, received))
        published = message(topic)
        await bus.publish([published])
        sent.append(published)
        for _ in range(turns):  # not a wait for anything: it moves where the cancel lands
            await asyncio.sleep(0)
        loop.cancel()
        done, _ = await asyncio.wait([loop], timeout=HANG_GUARD)
        ended_cancelled.append(loop in done and loop.cancelled())
        if not done:  # the cancellation was lost: the loop would receive forever
            loop.cancel()
            break

    # then every time the loop ended as cancelled
    assert all(ended_cancelled), f"the cancel after {len(ended_cancelled) - 1} turns was lost"

    # and every message published meanwhile reaches the group: what A received, plus what
    # another member gets once A closed (given back, or back after A's lease)
    await a.ack(received)
    await a.close()
    b = await (await make_transport()).subscribe(group, [topic], lease=LEASE)
    rest = await receive_acking(b, set(ids(sent)) - set(ids(received)), within=HANG_GUARD)
    assert set(ids(received)) | rest == set(ids(sent))


async def test_closing_a_member_ends_its_blocked_receive_and_loses_nothing(
    make_transport: TransportFactory,
) -> None:
    # given member A blocked in a receive that would wait a minute for a message
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    a = await (await make_transport()).subscribe(group, [topic], lease=LEASE)
    blocked = asyncio.create_task(a.receive(10, 60.0))
    await asyncio.sleep(0)  # not a wait for anything: lets the receive start

    # when A is closed, and a message is published afterwards
    await a.close()
    done, _ = await asyncio.wait([blocked], timeout=HANG_GUARD)
    blocked.cancel()
    sent = message(topic)
    await bus.publish([sent])

    # then the blocked receive ended with nothing (a closed member hands nothing out)
    assert blocked in done
    assert blocked.result() == []

    # and the message goes to another member of the group
    b = await (await make_transport()).subscribe(group, [topic], lease=LEASE)
    got = await receive_n(b, 1, within=HANG_GUARD)
    assert ids(got) == [sent.id]
    await b.ack(got)
