"""One hook surface and one outbox writer: observers that fail never break handling, every
writer stages rows with the transport's real size limit, and the relay sets aside a row that can
never be published instead of blocking the service's outbox."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

import choreograph
from choreograph import (
    App,
    Context,
    Envelope,
    Event,
    HandlerFailed,
    Middleware,
    Outcome,
    PayloadTooLarge,
    Runtime,
    Service,
)
from choreograph.clock import SYSTEM_CLOCK
from choreograph.envelope import encode, new_envelope
from choreograph.errors import InvalidMessage
from choreograph.middleware import Checkpoint, Next
from choreograph.runtime.hooks import Hooks
from choreograph.runtime.outbox import UNPUBLISHABLE
from choreograph.store import OutboxRow
from choreograph.testing import Harness
from choreograph.transport import Failure, Message
from choreograph.transports.memory import MemoryTransport


class Order(Event):
    order_id: str
    note: str = ""


class Paid(Event):
    order_id: str
    note: str = ""


def shop() -> App:
    payment = Service("payment")
    audit = Service("audit")

    @payment.on(Order, emits=[Paid])
    async def charge(event: Order, ctx: Context) -> Paid:
        return Paid(order_id=event.order_id, note=event.note)

    @audit.on(HandlerFailed)
    async def note_failure(event: HandlerFailed, ctx: Context) -> None:
        await ctx.state.put("failure", ctx.correlation_id, {"reason": event.reason})

    return App("shop", [payment, audit])


class Broken(Middleware):
    """An observer that raises in every hook it is guarded in."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def stamp(self, ctx: Context | None, envelope: Envelope) -> Envelope:
        self.calls.append("stamp")
        raise RuntimeError("stamp broke")

    def on_outcome(self, ctx: Context, outcome: Outcome) -> None:
        self.calls.append("on_outcome")
        raise RuntimeError("on_outcome broke")

    def on_invalid(self, service: str, body: bytes, failure: Failure) -> None:
        self.calls.append("on_invalid")
        raise RuntimeError("on_invalid broke")

    def checkpoint(self, service: str, point: Checkpoint) -> None:
        self.calls.append("checkpoint")
        raise RuntimeError("checkpoint broke")


async def test_an_observer_failing_in_a_guarded_hook_never_breaks_handling() -> None:
    # given a middleware that raises in stamp, on_outcome, on_invalid and checkpoint
    broken = Broken()
    async with Harness(shop(), middleware=[broken]) as h:
        # when an order and a malformed message arrive
        await h.publish(Order(order_id="o1"), correlation_id="tx-1")
        await h.transport.publish([Message("junk", "Order", b"not json")])
        # then the order is still paid, and the junk dead-lettered with its reason
        await h.wait_for(Paid, correlation_id="tx-1")
        await h.settle()
        (dead,) = await h.dead_letters("payment")
        assert dead.failure.reason == "malformed envelope"
    assert {"stamp", "on_outcome", "on_invalid", "checkpoint"} <= set(broken.calls)


async def test_a_failing_around_handle_counts_as_the_handlers_failure() -> None:
    # given a middleware whose around_handle raises (it is part of the handling)
    class Failing(Middleware):
        async def around_handle(self, ctx: Context, call_next: Next) -> list[Event]:
            raise PermissionError("policy refuses")

    async with Harness(shop(), middleware=[Failing()]) as h:
        # when an order arrives
        await h.publish(Order(order_id="o1"), correlation_id="tx-1")
        await h.advance(60)
        # then the handling failed, gave up after its retries, and announced it
        failed = await h.wait_for(HandlerFailed, correlation_id="tx-1")
        assert failed.data["error_type"] == "PermissionError"
        assert not h.published(Paid)


async def test_a_middleware_that_cannot_start_stops_the_runtime_start() -> None:
    class Unstartable(Middleware):
        async def start(self, runtime: object) -> None:
            raise RuntimeError("no exporter")

    # given a middleware whose start fails, then the runtime's start fails with its error
    with pytest.raises(RuntimeError, match="no exporter"):
        async with Harness(shop(), middleware=[Unstartable()]):
            pass


async def test_only_middleware_overriding_a_hook_are_called_for_it() -> None:
    # given one middleware that only observes outcomes and one that wraps handlings
    order: list[str] = []

    class Outcomes(Middleware):
        def on_outcome(self, ctx: Context, outcome: Outcome) -> None:
            order.append("outcome")

    class Around(Middleware):
        def __init__(self, name: str) -> None:
            self.name = name

        async def around_handle(self, ctx: Context, call_next: Next) -> list[Event]:
            order.append(f"{self.name} in")
            try:
                return await call_next()
            finally:
                order.append(f"{self.name} out")

    hooks = Hooks([Around("outer"), Outcomes(), Around("inner")])

    async def react() -> list[Event]:
        order.append("react")
        return []

    # when a handling runs through the hooks
    ctx = Context("s", new_envelope("T", {}, source="test"), 1, None, SYSTEM_CLOCK)  # type: ignore[arg-type]
    await hooks.handle(ctx, react)
    # then the onion holds, the first middleware outermost, the observer not involved
    assert order == ["outer in", "inner in", "react", "inner out", "outer out"]
    assert bool(Hooks()) is False and bool(hooks) is True


def test_middleware_module_does_not_import_the_runtime() -> None:
    # the hooks are typed against a protocol: no import cycle middleware -> runtime
    source = Path(choreograph.__file__).parent / "middleware.py"
    imported = [
        node.module or ""
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, ast.ImportFrom)
    ]
    assert imported and not [m for m in imported if m.startswith("choreograph.runtime")]


async def test_unit_of_work_stages_with_the_transports_real_limit() -> None:
    # given a bus that accepts at most 4 KiB per message
    async with Harness(shop()) as h:
        h.transport.max_message_bytes = 4096
        worker = h.runtime.worker("payment")
        worker.handling.max_event_bytes = 4096
        # when work from outside emits an event larger than that
        with pytest.raises(PayloadTooLarge, match="the limit is 4096"):
            async with h.runtime.unit_of_work("payment", correlation_id="tx-2") as uow:
                await uow.state.put("order", "o2", {"n": 1})
                uow.emit(Paid(order_id="o2", note="x" * 5000))
        # then nothing was committed: no state, no outbox row left to block the relay
        assert await h.state("payment", "order", "o2") is None
        assert await worker.store.claim_outbox(h.clock.now() + 3600, 10, 30) == []


def valid_rows(count: int) -> list[Envelope]:
    return [
        Envelope(f"v{i}", "Paid", "payment", f"tx-{i}", {"order_id": f"o{i}", "note": ""})
        for i in range(count)
    ]


async def test_an_oversized_outbox_row_never_blocks_the_relay() -> None:
    async with Harness(shop()) as h:
        worker = h.runtime.worker("payment")
        h.transport.max_message_bytes = 4096
        # given an outbox holding, oldest first, a row larger than the bus accepts (written when
        # the limit was larger), then valid ones
        big = OutboxRow("big-1", "Order", b'{"pad": "' + b"x" * 5000 + b'"}')
        async with worker.store.transaction() as tx:
            await tx.add_outbox([big])
            await worker.handling.stage(tx, [(e, 0.001) for e in valid_rows(3)])
        # when the relay runs
        await h.advance(1)
        # then the valid rows are published, the big one dead-lettered by reference for the
        # group it was meant for, and the outbox is empty
        assert sorted(e.id for e in h.published(Paid)) == ["v0", "v1", "v2"]
        (dead,) = await h.dead_letters("payment")
        assert (dead.message.id, dead.failure.reason) == ("big-1", "payload too large")
        assert hashlib.sha256(big.body).hexdigest() in dead.failure.error
        assert await worker.store.claim_outbox(h.clock.now() + 3600, 10, 30) == []


class _Refusing(MemoryTransport):
    """A bus with a rule of its own: it refuses, as invalid, messages whose id starts with
    'refused' (as a broker refuses what breaks one of its rules)."""

    async def publish(self, messages: Sequence[Message]) -> None:
        for message in messages:
            if message.id.startswith("refused"):
                raise InvalidMessage(f"message {message.id} breaks a rule of this bus")
        await super().publish(messages)


async def test_the_relay_sets_aside_a_row_the_transport_refuses_as_invalid(
    tmp_path: Path,
) -> None:
    # given a bus that refuses one row, and a reader of the events that row is among
    transport = _Refusing()
    runtime = Runtime(shop(), transport=transport, store=f"sqlite:///{tmp_path}/{{service}}.db")
    async with runtime:
        await transport.declare_group("reader", ["Paid"])
        worker = runtime.worker("payment")
        refused = OutboxRow("refused-1", "Paid", b'{"some": "body"}')
        valid = [OutboxRow(e.id, e.type, encode(e)) for e in valid_rows(3)]
        # when the outbox holds, oldest first, the refused row and then valid ones, for the relay
        async with worker.store.transaction() as tx:
            await tx.add_outbox([refused, *valid])

        async def set_aside() -> bool:
            async with runtime.unit_of_work("payment") as uow:
                return await uow.state.get(UNPUBLISHABLE, "refused-1") is not None

        await wait_for(set_aside)
        # then the valid rows are published, the refused one set aside with a bounded record
        reader = await transport.subscribe("reader", ["Paid"])
        received = await reader.receive(10, 1.0)
        assert sorted(d.message.id for d in received) == ["v0", "v1", "v2"]
        async with runtime.unit_of_work("payment") as uow:
            record = await uow.state.get(UNPUBLISHABLE, "refused-1")
        assert record is not None
        assert record["sha256"] == hashlib.sha256(refused.body).hexdigest()
        assert (record["topic"], record["bytes"]) == ("Paid", len(refused.body))
        assert "breaks a rule of this bus" in record["reason"]
        assert record["head"] == refused.body.decode()
        assert await worker.store.claim_outbox(time.time() + 3600, 10, 30) == []


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {predicate.__name__}"
        await asyncio.sleep(0.02)
