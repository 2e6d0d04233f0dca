"""Small helpers shared by the conformance tests: unique names, messages, bounded receive loops."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

import pytest

from choreograph.transport import Delivery, Message, Subscription

MEMORY_IS_ONE_PROCESS = (
    "memory:// lives inside one process: another process (or a restart) cannot share it"
)


def unique(prefix: str) -> str:
    """A group or topic name no other test uses (letters, digits and '_' only: valid everywhere)."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def message(topic: str, body: bytes | None = None, *, group: str | None = None) -> Message:
    event_id = uuid.uuid4().hex
    return Message(
        event_id, topic, body if body is not None else f"body {event_id}".encode(), group
    )


def messages(topic: str, count: int) -> list[Message]:
    return [message(topic) for _ in range(count)]


def ids(items: Iterable[Delivery | Message]) -> list[str]:
    return [item.message.id if isinstance(item, Delivery) else item.id for item in items]


async def receive_n(
    sub: Subscription, count: int, within: float, *, max_messages: int = 100
) -> list[Delivery]:
    """Receive until ``count`` deliveries arrived or ``within`` seconds passed (then return what
    arrived: the caller's assertion says what is missing)."""
    got: list[Delivery] = []
    deadline = time.monotonic() + within
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        got += await sub.receive(min(max_messages, count - len(got)), min(remaining, 0.5))
    return got


async def receive_acking(sub: Subscription, wanted: set[str], within: float) -> set[str]:
    """Receive and acknowledge until every id of ``wanted`` arrived or ``within`` seconds passed;
    the ids received. Acknowledging at once keeps what arrived from coming back when its lease
    runs out while the rest is awaited (at-least-once would count it twice)."""
    got: set[str] = set()
    deadline = time.monotonic() + within
    while not wanted <= got and (remaining := deadline - time.monotonic()) > 0:
        deliveries = await sub.receive(100, min(remaining, 0.5))
        got.update(ids(deliveries))
        await sub.ack(deliveries)
    return got


async def receive_for(
    sub: Subscription, seconds: float, *, max_messages: int = 100
) -> list[Delivery]:
    """Everything delivered to ``sub`` during ``seconds`` (used to check that nothing comes)."""
    got: list[Delivery] = []
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        got += await sub.receive(max_messages, min(remaining, 0.5))
    return got


def skip_memory(transport_name: str, reason: str = MEMORY_IS_ONE_PROCESS) -> None:
    if transport_name == "memory":
        pytest.skip(reason)
