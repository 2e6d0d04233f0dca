"""One service running in one process: receive → handle in one transaction per batch → publish →
settle; plus the housekeeping loop that fires due timers, relays leftover outbox rows and prunes
the inbox.

The housekeeping loop asks the store only when there is something to find: when a timer this
process knows of falls due, when an event it delayed (``emit_later``) or failed to publish is due
for the relay, and otherwise every ``housekeeping_interval`` (1 s by default) for what it cannot
know of: the timers and outbox rows of other replicas, and of a process that died. A commit that
sets an earlier timer or delays an event wakes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass

from choreograph.app import App
from choreograph.clock import Clock
from choreograph.context import Context
from choreograph.errors import ConfigurationError, TransportError
from choreograph.middleware import Checkpoint, Outcome
from choreograph.runtime.handling import Handling
from choreograph.runtime.hooks import Hooks
from choreograph.runtime.ordering import sequencer_for
from choreograph.runtime.outbox import FAST_PATH_CLAIM, relay
from choreograph.service import Service
from choreograph.store import DocumentBusy, Store
from choreograph.transport import (
    Delivery,
    Failure,
    Message,
    Subscription,
    Transport,
    load_backend,
)

log = logging.getLogger("choreograph.worker")

#: Deliveries of a message whose store transaction fails even when it is handled alone, after
#: which it is dead-lettered with reason ``poison message``.
POISON_ATTEMPTS = 3
#: Transactions handing work back (what it needed was busy) before the rest is left to come back
#: after its lease: each one waits for everything found busy so far, so few are ever needed.
HAND_BACKS = 20
#: Shortest time between two housekeeping passes: a timer fires at most this late, and a loop
#: told of many due times asks the store at most this often.
PASS_SPACING = 0.05
Result = tuple[Delivery, Context | None, Outcome]


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How a service consumes. The defaults suit most services."""

    concurrency: int = 2
    """Batches in flight at once (receive of one overlaps handling of another)."""
    batch_size: int = 200
    """Messages received and handled in one store transaction."""
    lease: float = 30.0
    """Seconds a received message stays reserved to this process before it is redelivered."""
    poll_interval: float = 0.5
    """Longest wait of one receive call (bounds how long shutdown waits for an idle lane)."""
    housekeeping_interval: float = 1.0
    """How often the store is asked for due timers and outbox rows this process was not told of:
    those of other replicas, and of a process that died. The timers this process sets and the
    events it delays or fails to publish are taken up when they fall due, whatever this is."""
    relay_lease: float = 30.0
    inbox_horizon: float = 7 * 24 * 3600.0
    """Processed event ids are remembered this long; a duplicate arriving later runs again."""

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.batch_size < 1:
            raise ConfigurationError("concurrency and batch_size must be at least 1")
        if self.lease <= 0 or self.poll_interval <= 0 or self.housekeeping_interval <= 0:
            raise ConfigurationError("lease and intervals must be positive seconds")


class ServiceWorker:
    def __init__(
        self,
        app: App,
        service: Service,
        transport: Transport,
        store: Store,
        *,
        clock: Clock,
        hooks: Hooks | None = None,
        settings: WorkerSettings = WorkerSettings(),
    ) -> None:
        self.service = service
        self.transport = transport
        self.store = store
        self.clock = clock
        self.settings = settings
        self.hooks = hooks or Hooks()
        self.handling = Handling(
            app, service, clock, self.hooks, max_event_bytes=transport.max_message_bytes
        )
        self._subscription: Subscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._sent: list[str] = []
        self._inflight = 0
        self._rng = random.Random()
        self._sequencer = sequencer_for(
            service,
            capacity=2 * settings.concurrency * settings.batch_size,
            lease=settings.lease,
            clock=clock,
        )
        self._receiving = asyncio.Lock()
        self._next_pass = 0.0  # clock time of the next housekeeping pass
        self._nudged = asyncio.Event()  # set when _next_pass moves earlier
        self._relay_at: list[float] = []  # (heap) when outbox rows this process knows of are due

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def inflight(self) -> int:
        """Messages received and not yet settled (those waiting for their key's turn too)."""
        waiting = self._sequencer.waiting if self._sequencer is not None else 0
        return self._inflight + waiting

    async def start(self) -> None:
        await self.store.open()
        if self.service.tables is not None:
            create_tables = load_backend(
                "choreograph.orm", "create_tables", "sqlalchemy", f"tables of {self.name}"
            )
            async with self.store.transaction() as tx:
                await create_tables(tx, self.service.tables)
        if self.handling.topics:
            self._subscription = await self.transport.subscribe(
                self.name, self.handling.topics, lease=self.settings.lease
            )
            for lane in range(self.settings.concurrency):
                self._spawn(self._lane(), f"{self.name}-lane-{lane}")
        self._spawn(self._housekeeping(), f"{self.name}-housekeeping")

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.append(task)

    async def stop(self) -> None:
        """Finish the batches in hand, hand back what was not started, flush the outbox."""
        self._stopping.set()
        for task in self._tasks:
            if task.get_name().endswith("housekeeping"):
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.close()
            self._subscription = None
        with contextlib.suppress(Exception):
            await self._forget_sent()
            await self._relay_due()
        await self.store.close()

    # consuming ----------------------------------------------------------------------------------

    async def _lane(self) -> None:
        assert self._subscription is not None
        subscription = self._subscription
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                batch = await self._next_batch(subscription)
                if batch:
                    await self._process(subscription, batch)
                backoff = 0.1
            except TransportError as exc:
                log.warning("%s: transport error, retrying in %.1fs: %s", self.name, backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                # A bug or an outage of the store: the batch was not settled, so its messages
                # come back after their lease. Keep consuming rather than die silently.
                log.exception("%s: batch failed, retrying in %.1fs", self.name, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _receive(
        self, subscription: Subscription, timeout: float | None = None
    ) -> list[Delivery]:
        timeout = self.settings.poll_interval if timeout is None else timeout
        receive = asyncio.ensure_future(subscription.receive(self.settings.batch_size, timeout))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not receive.done():
            receive.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receive
            return []
        return receive.result()

    async def _next_batch(self, subscription: Subscription) -> list[Delivery]:
        """A received batch; with ordering per key, the next deliveries whose key's turn it is
        (``runtime/ordering.py``): one lane receives at a time, so the sequencer sees the
        transport's order."""
        sequencer = self._sequencer
        if sequencer is None:
            return await self._receive(subscription)
        batch = sequencer.take(self.settings.batch_size)
        if batch:
            return batch
        wait = sequencer.due_in(self.settings.poll_interval)  # until a kept retry is due
        if self._receiving.locked() or not sequencer.may_receive():
            await sequencer.changed(wait)
            return []
        async with self._receiving:
            sequencer.add(await self._receive(subscription, wait))
        return sequencer.take(self.settings.batch_size)

    async def _process(self, subscription: Subscription, batch: list[Delivery]) -> None:
        self._inflight += len(batch)
        released = False
        try:
            try:
                results = await self._handle(batch)
            except Exception as exc:
                results = await self._isolate(batch, exc)
            self._checkpoint("committed")
            self._expect_later(ctx for _, ctx, _ in results)
            await self._publish([m for _, _, o in results for m in o.ready])
            self._checkpoint("published")
            if self._sequencer is not None:
                # Committed and published: the keys' next events may go (a settlement that
                # fails brings a duplicate back, which the inbox skips). A short retry is kept
                # by the sequencer, unsettled; a longer one parks its key.
                retried = {d.message.id: o.delay for d, _, o in results if o.kind == "retry"}
                kept = self._sequencer.done(batch, retried, committed=True)
                settle = [r for r in results if r[0].message.id not in kept] if kept else results
            else:
                settle = results
            released = True
            await self._settle(subscription, settle)
            self._checkpoint("settled")
            for _, ctx, outcome in results:
                if ctx is not None:
                    self._observe(ctx, outcome)
        finally:
            self._inflight -= len(batch)
            if self._sequencer is not None and not released:
                # Not committed: the messages come back after their lease; their keys wait.
                self._sequencer.done(batch, {}, committed=False)

    async def _handle(self, batch: list[Delivery]) -> list[Result]:
        """Handle ``batch`` in one store transaction (each handling in a savepoint of its own,
        which costs nothing unless it writes state).

        The transaction never waits for what another one (a lane, a replica) holds: a handling
        that touches it is rolled back and *handed back* (:class:`DocumentBusy`), the others
        commit, and the handed-back messages are handled again in a next transaction that first
        waits for what was busy. No attempt is spent on it; nothing waits while holding a lock,
        so lanes and replicas never deadlock."""
        results: list[Result] = []
        pending, lock_first = batch, list[tuple[str, str]]()
        for _ in range(HAND_BACKS):
            sent, self._sent = self._sent, []
            try:
                async with self.store.transaction(locks="raise", lock_first=lock_first) as tx:
                    if sent:
                        await tx.forget_outbox(sent)
                    handled, handed_back = await self.handling.handle_batch(tx, pending)
                    self._checkpoint("handled")
            except BaseException:
                self._sent += sent  # not forgotten: the next transaction does it
                raise
            results += handled
            if not handed_back:
                return results
            pending = [delivery for delivery, _ in handed_back]
            lock_first += [lock for _, lock in handed_back]
        log.warning("%s: %d messages still wait for busy documents; they come back after their "
                    "lease", self.name, len(pending))  # fmt: skip
        return results

    async def _isolate(self, batch: list[Delivery], failed: Exception) -> list[Result]:
        """The batch's transaction failed as a whole: handle its messages one at a time, so that
        one message that breaks its transaction (e.g. the store refuses what it holds) does not
        take the others down. A message failing alone while the store answers is retried, and
        dead-lettered once it has been delivered :data:`POISON_ATTEMPTS` times. When the store
        does not answer, ``failed`` propagates: nothing is settled, the messages come back."""
        await self._probe_store(failed)
        log.warning("%s: a batch of %d failed (%s: %s); handling its messages one at a time",
                    self.name, len(batch), type(failed).__name__, failed)  # fmt: skip
        results: list[Result] = []
        for delivery in batch:
            try:
                results += await self._handle([delivery])
            except Exception as exc:
                await self._probe_store(exc)
                results.append((delivery, None, self._poisoned(delivery, exc)))
        return results

    async def _probe_store(self, failed: Exception) -> None:
        """Raise ``failed`` unless an empty transaction of the store commits."""
        try:
            async with self.store.transaction():
                pass
        except Exception:
            raise failed from None

    def _poisoned(self, delivery: Delivery, exc: Exception) -> Outcome:
        failure = Failure(
            reason="poison message",
            error_type=type(exc).__name__,
            error=f"its store transaction fails on its own: {exc}"[:2000],
        )
        if delivery.attempt < POISON_ATTEMPTS:
            delay = self.service.retry.delay(delivery.attempt, self._rng)
            return Outcome("retry", delay=delay, failure=failure)
        log.error("%s: message %s dead-lettered: %s", self.name, delivery.message.id,
                  failure.error)  # fmt: skip
        self.hooks.invalid(self.name, delivery.message.body, failure)
        return Outcome("dead_letter", failure=failure)

    async def _publish(self, messages: list[Message]) -> None:
        """Publish freshly committed outbox rows; on failure the relay sends them later."""
        if not messages:
            return
        try:
            await self.transport.publish(messages)
        except Exception as exc:
            log.warning("%s: publish failed, the outbox relay will retry: %s", self.name, exc)
            # their rows are claimed by this process until then
            self._relay_by(self.clock.now() + FAST_PATH_CLAIM)
            return
        self._sent.extend(m.id for m in messages)
        # forgotten by the next transaction, or by a pass well before their claim runs out
        self._pass_by(self.clock.now() + FAST_PATH_CLAIM / 2)

    async def _settle(self, subscription: Subscription, results: list[Result]) -> None:
        """Ack, retry or dead-letter each message. A settlement that fails for one message does
        not stop the others' (an unsettled message comes back after its lease)."""
        done = [d for d, _, o in results if o.kind in ("done", "duplicate", "ignored", "late")]
        if done:
            await subscription.ack(done)
        unsettled: Exception | None = None
        for delivery, _, outcome in results:
            try:
                if outcome.kind == "retry":
                    await subscription.retry(delivery, outcome.delay)
                elif outcome.kind == "dead_letter":
                    assert outcome.failure is not None
                    await self._dead_letter(subscription, delivery, outcome.failure)
            except Exception as exc:
                log.warning("%s: could not settle %s (%s): %s", self.name,
                            delivery.message.id, outcome.kind, exc)  # fmt: skip
                unsettled = exc
        if isinstance(unsettled, TransportError):
            raise unsettled  # the lane backs off

    async def _dead_letter(
        self, subscription: Subscription, delivery: Delivery, failure: Failure
    ) -> None:
        try:
            await subscription.dead_letter(delivery, failure)
        except TransportError:
            raise
        except Exception as exc:
            # The failure itself could not be recorded (its text): record a bounded one.
            log.warning("%s: dead letter of %s refused (%s); recording a shorter reason",
                        self.name, delivery.message.id, exc)  # fmt: skip
            short = Failure(
                failure.reason[:100],
                failure.error_type[:100],
                failure.error[:200].encode("ascii", "replace").decode("ascii"),
            )
            await subscription.dead_letter(delivery, short)

    def _checkpoint(self, point: Checkpoint) -> None:
        self.hooks.checkpoint(self.name, point)

    def _observe(self, ctx: Context, outcome: Outcome) -> None:
        self.hooks.outcome(ctx, outcome)

    # housekeeping -------------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        last_prune = 0.0
        while not self._stopping.is_set():
            started = self.clock.now()
            self._next_pass = started + self.settings.housekeeping_interval
            try:
                await self._forget_sent()
                due = await self._fire_due_timers()
                if due is not None:
                    self._pass_by(due)
                await self._relay_due()
                while self._relay_at and self._relay_at[0] <= started:
                    heapq.heappop(self._relay_at)  # relayed now, if it was not already
                if self._relay_at:
                    self._pass_by(self._relay_at[0])
                now = self.clock.now()
                if now - last_prune > 3600:
                    last_prune = now
                    await self.store.prune_inbox(now - self.settings.inbox_horizon)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: housekeeping failed, will retry: %s", self.name, exc)
            await self._until_next_pass(started + PASS_SPACING)

    def _pass_by(self, when: float) -> None:
        """Have the housekeeping loop pass at ``when`` (clock time) at the latest."""
        if when < self._next_pass:
            self._next_pass = when
            self._nudged.set()

    def _relay_by(self, when: float) -> None:
        """Have the relay run at ``when`` (clock time) at the latest."""
        heapq.heappush(self._relay_at, when)
        self._pass_by(when)

    def _expect_later(self, contexts: Iterable[Context | None]) -> None:
        """Committed handlings: a pass when the first timer they set or event they delayed is
        due (the relay publishes delayed events). A timer need not be remembered here: each
        pass asks the store when the next one is due."""
        now = self.clock.now()
        for ctx in contexts:
            if ctx is None:
                continue
            for change in ctx.timers:
                if change.due_at is not None:
                    self._pass_by(change.due_at)
            for _, delay in ctx.later:
                if delay > 0:
                    self._relay_by(now + delay)  # (staged before now: due by then)

    async def _until_next_pass(self, earliest: float) -> None:
        """Sleep until the next pass (not before ``earliest``), waking earlier when told to."""
        while True:
            wait = max(self._next_pass, earliest) - self.clock.now()
            if wait <= 0:
                return
            self._nudged.clear()
            sleep = asyncio.ensure_future(self.clock.sleep(wait))
            nudged = asyncio.ensure_future(self._nudged.wait())
            try:
                await asyncio.wait({sleep, nudged}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleep.cancel()
                nudged.cancel()

    async def _forget_sent(self) -> None:
        if self._sent:
            ids, self._sent = self._sent, []
            await self.store.mark_sent(ids)

    async def _fire_due_timers(self) -> float | None:
        """Fire the timers due now; return when the next one is due (None: there is none)."""
        now = self.clock.now()
        due = await self.store.next_timer_due()
        lock_first: list[tuple[str, str]] = []
        while due is not None and due <= now:
            fired: list[tuple[Context, Outcome]] = []
            try:
                async with self.store.transaction(locks="raise", lock_first=lock_first) as tx:
                    for timer in await tx.take_due_timers(now, 100):
                        fired.append(await self.handling.fire(tx, timer))
            except DocumentBusy as busy:
                # Rolled back: the timers are due again. Take them again, waiting for what was
                # busy first (or at the next round, if that keeps happening).
                lock_first.append(busy.lock)
                if len(lock_first) > HAND_BACKS:
                    return due
                continue
            lock_first = []
            if not fired:
                break
            self._expect_later(ctx for ctx, _ in fired)
            await self._publish([m for _, o in fired for m in o.ready])
            for ctx, outcome in fired:
                self._observe(ctx, outcome)
            due = await self.store.next_timer_due()
        return due

    async def _relay_due(self) -> None:
        """Publish outbox rows that are due and unclaimed: delayed emissions, and rows whose
        fast-path publish failed or whose process died before publishing them."""
        await relay(self.store, self.transport, self.clock, lease=self.settings.relay_lease)
