"""The handling reads ahead, for a batch, the documents its handlers got under their correlation
id before: the handlers get what was committed, and a message whose document another replica
holds is handed back before its handler runs."""

from __future__ import annotations

import uuid

import pytest

from choreograph import App, Context, Event, Service
from choreograph.clock import SystemClock
from choreograph.envelope import Envelope, encode
from choreograph.runtime.handling import Handling
from choreograph.store import store_from_url
from choreograph.transport import Delivery, Message
from tests.stores.conftest import PG_URL

pytestmark = pytest.mark.postgres


class Tracked(Event):
    status: str


def delivery(correlation_id: str, status: str) -> Delivery:
    envelope = Envelope(
        id=str(uuid.uuid4()),
        type="Tracked",
        source="test",
        correlationid=correlation_id,
        data={"status": status},
    )
    return Delivery(Message(envelope.id, envelope.type, encode(envelope)), 1)


async def test_a_batch_reads_ahead_what_its_handlers_got_and_hands_back_what_is_busy(
    pg_namespace: str,
) -> None:
    ran: list[str] = []
    tracker = Service("tracker")

    @tracker.on(Tracked)
    async def track(event: Tracked, ctx: Context) -> None:
        ran.append(ctx.correlation_id)
        doc = await ctx.state.get("delivery", ctx.correlation_id) or {"history": []}
        await ctx.state.put(
            "delivery", ctx.correlation_id, {"history": [*doc["history"], event.status]}
        )

    handling = Handling(App("read-ahead", [tracker]), tracker, SystemClock())
    url = f"{PG_URL}?schema={pg_namespace}_{{service}}"
    store, other = store_from_url(url, "tracker"), store_from_url(url, "tracker")
    await store.open()
    await other.open()
    try:
        # given a first batch whose handler got the delivery's document (learnt: read ahead)
        async with store.transaction(locks="raise") as tx:
            handled, handed_back = await handling.handle_batch(
                tx, [delivery("c1", "requested"), delivery("c2", "requested")]
            )
        assert [outcome.kind for _, _, outcome in handled] == ["done", "done"]
        assert not handed_back

        # when another replica holds c1's document while a batch for c1 and c2 runs
        async with other.transaction(locks="raise") as holder:
            assert await holder.get("delivery", "c1") == {"history": ["requested"]}
            async with store.transaction(locks="raise") as tx:
                handled, handed_back = await handling.handle_batch(
                    tx, [delivery("c1", "scheduled"), delivery("c2", "scheduled")]
                )

        # then c1's message was handed back before its handler ran, c2's handled
        assert [lock for _, lock in handed_back] == [("delivery", "c1")]
        assert [outcome.kind for _, _, outcome in handled] == ["done"]
        assert ran == ["c1", "c2", "c2"]
        # and each handler got what was committed before it
        async with store.transaction() as tx:
            assert await tx.get("delivery", "c1") == {"history": ["requested"]}
            assert await tx.get("delivery", "c2") == {"history": ["requested", "scheduled"]}
    finally:
        await store.close()
        await other.close()
