"""Outbox rows: the one way every writer stages them, and how the relay publishes them.

Every event a service emits (from a handler, a failure announcement, a timer, or
:meth:`Runtime.unit_of_work`) goes through :func:`stage`: encoded once, with the transport's real
size limit, into the store transaction's outbox. Rows due now are claimed for the fast path (the
writer publishes them right after its commit); delayed rows are left to the relay.

The relay (:func:`relay`) publishes rows that are due and unclaimed. A row larger than the
transport accepts is dead-lettered by reference by the transport itself (for the groups it was
meant for; see :meth:`Transport.publish`). A row the transport refuses as invalid is **set
aside**: it leaves the outbox and a bounded record of it (id, topic, size, SHA-256 digest of the
body, the first bytes of the body, reason) is kept in the service's own state under the kind
:data:`UNPUBLISHABLE`, and logged as an error. One such row never holds back the others.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

from choreograph.clock import Clock
from choreograph.envelope import Envelope, encode
from choreograph.errors import InvalidMessage
from choreograph.store import OutboxRow, Store, StoreTx
from choreograph.transport import Message, Transport, redact

log = logging.getLogger("choreograph.outbox")

#: How long a writer keeps its freshly committed outbox rows to itself before the relay may
#: publish them (it publishes them at once; the relay only picks up after a crash or an outage).
FAST_PATH_CLAIM = 10.0
#: The state kind of the records of rows set aside by the relay (``State.find(UNPUBLISHABLE)``).
UNPUBLISHABLE = "_unpublishable"
_HEAD_BYTES = 512


async def stage(
    tx: StoreTx,
    envelopes: Sequence[tuple[Envelope, float]],
    *,
    limit: int,
    now: float,
) -> list[Message]:
    """Add ``(envelope, delay)`` pairs to ``tx``'s outbox, in order; return the messages due now,
    to publish right after the commit.

    Every envelope is encoded before any row is added: one that cannot be encoded within
    ``limit`` raises :class:`~choreograph.errors.InvalidMessage` and nothing is staged.
    """
    rows = [(OutboxRow(e.id, e.type, encode(e, limit=limit)), delay) for e, delay in envelopes]
    ready = [row for row, delay in rows if delay <= 0]
    later = [
        OutboxRow(row.id, row.topic, row.body, now + delay) for row, delay in rows if delay > 0
    ]
    if ready:
        await tx.add_outbox(ready, claimed_until=now + FAST_PATH_CLAIM)
    if later:
        await tx.add_outbox(later)
    return [Message(row.id, row.topic, row.body) for row in ready]


async def relay(store: Store, transport: Transport, clock: Clock, *, lease: float) -> None:
    """Publish the rows of ``store``'s outbox that are due and unclaimed, until none is left;
    set aside the rows that can never be published. A transport error propagates (the rows are
    claimed for ``lease`` seconds, then due again)."""
    while True:
        rows = await store.claim_outbox(clock.now(), 500, lease)
        if not rows:
            return
        # An oversized row is no obstacle: the transport dead-letters it by reference for the
        # groups it was meant for (see Transport.publish) and publishes the rest.
        refused: list[tuple[OutboxRow, str]] = []
        sent = [r.id for r in rows]
        try:
            await transport.publish([Message(r.id, r.topic, r.body) for r in rows])
        except InvalidMessage:
            # The transport refuses one of them for good: publish one at a time to find which.
            sent = []
            for row in rows:
                try:
                    await transport.publish([Message(row.id, row.topic, row.body)])
                except InvalidMessage as exc:
                    refused.append((row, f"{type(exc).__name__}: {exc}"[:1000]))
                else:
                    sent.append(row.id)
        if refused:
            await set_aside(store, refused, clock.now())
        await store.mark_sent(sent)


async def set_aside(store: Store, rows: Sequence[tuple[OutboxRow, str]], now: float) -> None:
    """Move rows that can never be published out of the outbox, keeping a bounded record of
    each (a dead letter by reference: the digest identifies the body, the head shows it)."""
    async with store.transaction() as tx:
        for row, reason in rows:
            digest = hashlib.sha256(row.body).hexdigest()
            record = {
                "id": row.id,
                "topic": row.topic,
                "bytes": len(row.body),
                "sha256": digest,
                # (no NUL: a PostgreSQL store cannot keep it in a document)
                "head": row.body[:_HEAD_BYTES].decode("utf-8", "replace").replace("\x00", "\ufffd"),
                "reason": reason,
                "at": now,
            }
            await tx.put(UNPUBLISHABLE, row.id, record)
            log.error(
                "%s: outbox row %s (%s, %d bytes, sha256 %s) can never be published and is set "
                "aside: %s",
                redact(store.url),
                row.id,
                row.topic,
                len(row.body),
                digest[:16],
                reason,
            )
        await tx.forget_outbox([row.id for row, _ in rows])
