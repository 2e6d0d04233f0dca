"""Ordering per key inside one process: the stage between receiving and handling.

A service whose handlers declare ``ordered_by`` gets a :class:`Sequencer`. Received deliveries
are added to it in the order the transport delivered them (the worker receives one batch at a
time for it), and the worker's lanes take their batches from it. The guarantees:

* **One key, arrival order.** A delivery is handed out only when no earlier delivery of its key
  is waiting or in flight in another lane; a batch holds at most one delivery per key, because
  the messages of a batch share one transaction and a retry of one of them must not be followed
  by a later one of its key in the same transaction.
* **Different keys in parallel.** A key waiting for its predecessor holds back only its own
  deliveries: the other keys, and the events without a key, go to whichever lane is free.
* **A retry stays in front.** A retry whose delay is at most half the lease is kept here: the
  delivery stays unsettled (its lease covers the wait; a crash brings it back through the
  transport) and is handed out again, as its next attempt, once the delay has passed, before
  the later deliveries of its key. A longer retry goes through the transport and parks its key:
  later deliveries of that key wait until the retried message comes back and is handled. If it
  does not come back to this process within its delay plus the lease (another replica took it,
  or the member's cap of unacknowledged messages is full), the key goes on without it.
* **Redelivery.** A delivery received again while an earlier copy of it still waits here (its
  lease ran out) replaces that copy in its place; a copy received while the first is in flight
  waits behind it, and is then a duplicate (the inbox skips it).

A dead-lettered delivery is skipped: the key goes on, and a replay of it comes after the events
that were handled meanwhile. Ordering is per process: what holds across replicas depends on the
transport (``docs/ordering.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import orjson

from choreograph.clock import SYSTEM_CLOCK, Clock
from choreograph.service import CORRELATION, Service
from choreograph.transport import Delivery

KeyOf = Callable[[Delivery], "str | None"]


def ordering_fields(service: Service) -> dict[str, str]:
    """The field (or :data:`CORRELATION`) ordering each event type of ``service``, by type."""
    return {
        cls.event_type: spec.ordered_by
        for cls, spec in service.handlers.items()
        if spec.ordered_by is not None
    }


def key_reader(fields: Mapping[str, str]) -> KeyOf:
    """A function giving a delivery's ordering key: the value of its type's ordering field, as
    text, or None (not ordered: its type has no ``ordered_by``, the field is absent, or the body
    is not a readable event; such a delivery is handed out at once and handling judges it)."""

    def key_of(delivery: Delivery) -> str | None:
        try:
            doc = orjson.loads(delivery.message.body)
            field = fields.get(doc["type"])
            if field is None:
                return None
            if field == CORRELATION:
                value = doc.get("correlationid") or doc["id"]
            else:
                value = doc["data"][field]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        if isinstance(value, str):
            return value
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()

    return key_of


@dataclass(slots=True)
class _Waiting:
    delivery: Delivery
    key: str | None
    due: float = 0.0
    """A retry kept here: not handed out before this time (the clock's)."""


@dataclass(frozen=True, slots=True)
class _Parked:
    message_id: str
    until: float


class Sequencer:
    """Received deliveries waiting for their turn, and the keys in flight (one process)."""

    def __init__(
        self, key_of: KeyOf, *, capacity: int, lease: float, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._key_of = key_of
        self._capacity = capacity
        self._lease = lease
        self._clock = clock
        self._waiting: dict[str, _Waiting] = {}  # by message id, in arrival order
        self._busy: dict[str, str] = {}  # message id in flight -> its key
        self._keys_busy: set[str] = set()
        self._parked: dict[str, _Parked] = {}
        self._changed = asyncio.Event()

    @property
    def waiting(self) -> int:
        """Deliveries received and not yet handed out."""
        return len(self._waiting)

    def may_receive(self) -> bool:
        """Whether a lane should receive more: below capacity, or nothing in flight (so keys
        parked for a retry never stop the retried message from being received)."""
        return len(self._waiting) < self._capacity or not self._keys_busy

    def add(self, deliveries: Iterable[Delivery]) -> None:
        """Deliveries as received, in the transport's order."""
        for delivery in deliveries:
            message_id = delivery.message.id
            earlier = self._waiting.get(message_id)
            if earlier is not None:
                earlier.delivery = delivery  # the newest lease of it, in the first copy's place
            else:
                self._waiting[message_id] = _Waiting(delivery, self._key_of(delivery))
        self._wake()

    def take(self, limit: int) -> list[Delivery]:
        """Up to ``limit`` deliveries whose turn it is, oldest first, at most one per key; their
        keys are in flight until :meth:`done`."""
        now = self._clock.now()
        taken: list[Delivery] = []
        taken_keys: set[str] = set()
        for message_id, item in list(self._waiting.items()):
            if len(taken) >= limit:
                break
            key = item.key
            if key is not None:
                if key in taken_keys or key in self._keys_busy:
                    continue
                if item.due > now:
                    taken_keys.add(key)  # a kept retry, not yet due: its key waits for it
                    continue
                if not self._turn(key, message_id, now):
                    continue  # parked: only its retried message may go, wherever it is queued
                taken_keys.add(key)
                self._keys_busy.add(key)
                self._busy[message_id] = key
            del self._waiting[message_id]
            taken.append(item.delivery)
        return taken

    def _turn(self, key: str, message_id: str, now: float) -> bool:
        parked = self._parked.get(key)
        if parked is None:
            return True
        if parked.message_id == message_id or parked.until <= now:
            del self._parked[key]
            return True
        return False

    def done(
        self, deliveries: Iterable[Delivery], retried: Mapping[str, float], *, committed: bool
    ) -> set[str]:
        """The lane is finished with ``deliveries``: ``committed`` and their emitted events
        published (a settlement failing after this brings back a duplicate, which the inbox
        skips), or not committed and left to their lease (their keys park until they come back).
        Of those to retry (``retried``: message id -> delay), the ones with a delay of at most
        half the lease are kept here (returned: the caller does not settle them), the others
        park their key until they come back, at most their delay plus the lease."""
        now = self._clock.now()
        kept: set[str] = set()
        for delivery in deliveries:
            message_id = delivery.message.id
            key = self._busy.pop(message_id, None)
            if key is None:
                continue
            self._keys_busy.discard(key)
            if not committed:
                self._parked[key] = _Parked(message_id, now + self._lease)
            elif message_id in retried and retried[message_id] <= self._lease / 2:
                again = Delivery(delivery.message, delivery.attempt + 1, delivery.handle)
                first = {message_id: _Waiting(again, key, now + retried[message_id])}
                self._waiting = first | {i: w for i, w in self._waiting.items() if i != message_id}
                kept.add(message_id)
            elif message_id in retried:
                self._parked[key] = _Parked(message_id, now + retried[message_id] + self._lease)
        self._wake()
        return kept

    def due_in(self, longest: float) -> float:
        """Seconds until the next kept retry is due (a lane waits no longer), at most
        ``longest``."""
        now = self._clock.now()
        dues = [w.due - now for w in self._waiting.values() if w.due > 0]
        return max(0.001, min([longest, *dues]))

    async def changed(self, timeout: float) -> None:
        """Wait until deliveries are added or keys released, or ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


def sequencer_for(
    service: Service, *, capacity: int, lease: float, clock: Clock = SYSTEM_CLOCK
) -> Sequencer | None:
    """The sequencer of ``service``, or None when none of its handlers declares ``ordered_by``."""
    fields = ordering_fields(service)
    if not fields:
        return None
    return Sequencer(key_reader(fields), capacity=capacity, lease=lease, clock=clock)
