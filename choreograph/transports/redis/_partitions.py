"""A member of a key-partitioned group: it reads only the partitions it holds a lease on.

Each partition of the group is read by one member at a time, so the events of one key (which all
land in one partition) are received by one member at a time, in publish order
(:meth:`RedisTransport.orders_across_members`). The members share the partitions out between
them (``_partition_lua.BALANCE``, every housekeeping interval, in a task of the member's own):

* a member takes free partitions up to its fair share, ``ceil(partitions / live members)``;
* above it (a member joined), it stops reading its surplus partitions, finishes and settles what
  it holds of them, and only then lets them go: the next holder starts after the last event the
  previous one handled;
* a member that closes lets its partitions go at once; one that dies (SIGKILL, lost connection)
  keeps them until its lease (the subscription's ``lease``) runs out;
* a member taking a partition first receives what its previous holder left unsettled, in its
  place (``_partition_lua.TAKEOVER``), before anything newer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from choreograph.errors import ChoreographError
from choreograph.transport import Delivery
from choreograph.transports.redis._records import decode_entry, decode_frames
from choreograph.transports.redis._subscription import (
    _ACK_CHUNK,
    _REAP_IDLE_MS,
    RedisSubscription,
)

if TYPE_CHECKING:
    from choreograph.transports.redis._transport import RedisTransport

log = logging.getLogger("choreograph.transports.redis")

_TAKEOVER_LIMIT = 1000


class PartitionedSubscription(RedisSubscription):
    """One member of a partitioned group. A delivery's handle is ``(partition, entry id)``."""

    def __init__(
        self,
        bus: RedisTransport,
        group: str,
        topics: frozenset[str],
        lease: float,
        partitions: int,
    ) -> None:
        super().__init__(bus, group, topics, lease)
        self._partitions = partitions
        self._reading: list[int] = []
        """The partitions this member holds and reads, as the last balance found them."""
        self._taken: set[int] = set()
        """Partitions just taken whose previous holder's unsettled entries come first."""
        self._blocked_on: set[int] = set()
        """Partitions a blocking read is waiting on (not let go meanwhile)."""
        self._turn = 0
        self._balancer: asyncio.Task[None] | None = None

    def partition_stream(self, partition: int | str) -> str:
        return f"{self._stream}:{partition}"

    @property
    def partitions(self) -> list[int]:
        """The partitions this member reads now (for tests and the console)."""
        return sorted(self._reading)

    async def start(self) -> None:
        await self._balance()
        self._balancer = asyncio.create_task(self._balance_loop(), name=f"balance-{self.group}")

    async def _balance(self) -> None:
        bus = self._bus
        busy = [str(p) for p in self._blocked_on]
        args = [bus._prefix, self.group, self._partitions, self._consumer, self._lease_ms, *busy]
        mine, taken = await bus._script("balance", [], args, "receive")
        reading = [int(p) for p in mine]
        self._taken = {p for p in self._taken if p in reading} | {int(p) for p in taken}
        self._reading = reading

    async def _balance_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._interval)
            try:
                await self._balance()
            except ChoreographError as exc:  # Redis away: the next pass tries again
                log.warning("redis: balancing the partitions of %s failed: %s", self.group, exc)

    # receiving

    def _rotated(self, partitions: list[int]) -> list[int]:
        """The partitions, starting at a different one each read, so none is always last."""
        if not partitions:
            return []
        self._turn = (self._turn + 1) % len(partitions)
        return partitions[self._turn :] + partitions[: self._turn]

    async def _read(self, count: int) -> list[Delivery]:
        bus = self._bus
        got: list[Delivery] = []
        for p in sorted(self._taken):
            if len(got) >= count:
                return got
            key = f"{bus._prefix}part:{self.group}:{p}"
            want = min(count - len(got), _TAKEOVER_LIMIT)
            more, blob = await bus._script(
                "takeover",
                [self.partition_stream(p)],
                [self.group, self._consumer, want, key],
                "receive",
            )
            got += self._tagged(p, decode_frames(blob) if blob else [])
            if not int(more):
                self._taken.discard(p)
        ready = [p for p in self._reading if p not in self._taken]
        if len(got) >= count or not ready:
            return got
        args = [bus._prefix, self.group, self._consumer, count - len(got), *self._rotated(ready)]
        reply = await bus._script("read_partitions", [], args, "receive")
        for i in range(0, len(reply), 2):
            got += self._tagged(int(reply[i]), decode_frames(reply[i + 1]))
        return got

    async def _read_blocking(self, wait: float) -> list[Delivery]:
        ready = [p for p in self._reading if p not in self._taken]
        if not ready:  # nothing to read yet: the balance may give this member partitions
            await asyncio.sleep(min(wait, self._interval))
            return []
        client = self._bus._redis()
        block_ms = max(1, int(min(wait, self._interval) * 1000))
        streams: dict[Any, Any] = {self.partition_stream(p): ">" for p in ready}
        self._blocked_on.update(ready)
        try:
            reply: Any = await self._bus._call(
                lambda: client.xreadgroup(
                    self.group, self._consumer, streams, count=1, block=block_ms
                ),
                "receive",
            )
        finally:
            self._blocked_on.difference_update(ready)
        got: list[Delivery] = []
        for stream, entries in reply or []:
            p = int(stream.decode().rpartition(":")[2])
            got += self._tagged(p, [decode_entry(eid, e) for eid, e in entries if e])
        return got

    @staticmethod
    def _tagged(partition: int, deliveries: list[Delivery]) -> list[Delivery]:
        for d in deliveries:
            d.handle = (partition, d.handle)
        return deliveries

    async def _housekeep(self, want: int) -> list[Delivery]:
        """Moves due retries, and takes back this member's own deliveries whose lease ran out,
        in each partition it reads."""
        bus = self._bus
        got: list[Delivery] = []
        wait = -1
        settled: list[int | None] = [p for p in self._reading if p not in self._taken]
        for p in settled or [None]:
            stream = self._stream if p is None else self.partition_stream(p)
            wait_us, blob = await bus._script(
                "housekeep",
                [stream, bus._delayed_key, bus._delayed_counts_key],
                [bus._prefix, self.group, self._consumer, self._lease_ms, max(1, want),
                 _REAP_IDLE_MS],
                "receive",
            )  # fmt: skip
            wait = int(wait_us)
            if p is not None and blob:
                got += self._tagged(p, decode_frames(blob))
        now = time.monotonic()
        self._next_due = None if wait < 0 else now + wait / 1e6
        self._next_housekeeping = now + self._interval
        return got

    # settling

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        by_partition: dict[int, list[bytes]] = {}
        for d in deliveries:
            p, eid = d.handle
            by_partition.setdefault(p, []).append(eid)
        for p, eids in by_partition.items():
            stream = self.partition_stream(p)
            for start in range(0, len(eids), _ACK_CHUNK):
                chunk = eids[start : start + _ACK_CHUNK]
                await self._bus._script("ack", [stream], [self.group, *chunk], "ack")
        held = self._held
        for d in deliveries:
            held.pop(d.handle, None)

    def _place(self, delivery: Delivery) -> tuple[str, bytes, list[str]]:
        partition, entry = delivery.handle
        return self.partition_stream(partition), entry, [str(partition)]

    async def _give_back(self, deliveries: Collection[Delivery]) -> None:
        """Let the partitions go at once. What this member held unsettled stays in its place in
        its partition, and the partition's next holder receives it first (as a redelivery):
        unlike a plain group, a partition keeps its order through a graceful restart."""
        bus = self._bus
        args = [bus._prefix, self.group, self._partitions, self._consumer]
        try:
            await bus._script("leave", [], args, "close", retry=False)
        except ChoreographError as exc:
            log.warning("redis: could not let the partitions of %s go: %s", self.group, exc)

    async def close(self) -> None:
        if self._closed:
            return
        balancer, self._balancer = self._balancer, None
        if balancer is not None:
            balancer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await balancer
        await super().close()
