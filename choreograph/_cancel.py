"""Cancellation a driver lost underneath, raised again.

Python 3.11's :func:`asyncio.wait_for` returns its operation's result instead of raising when
the cancellation of the waiting task arrives in the loop iteration in which the operation
completes (CPython gh-86296, fixed in 3.12). Drivers use it in their hot paths (redis-py around
every command it writes), so a task cancelled while it talks to a broker can carry on as if
nothing happened, and a loop that stops only by cancellation (a recorder, a housekeeping task)
then never ends. Our own waits use :func:`asyncio.timeout`, which has no such race.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def honouring_cancel(operation: Awaitable[T]) -> T:
    """Await ``operation``; if this task was asked to cancel meanwhile and the request did not
    reach it as :class:`asyncio.CancelledError`, raise that now.

    A cancellation that was delivered and deliberately undone underneath (an expired
    :func:`asyncio.timeout`, :meth:`asyncio.Task.uncancel`) leaves the task's count of pending
    requests where it was, so it is not raised again; neither is one requested before the call
    (cleanup running in an already cancelled task goes on)."""
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    try:
        result = await operation
    except Exception as exc:
        if task is not None and task.cancelling() > before:
            raise asyncio.CancelledError from exc
        raise
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError
    return result
