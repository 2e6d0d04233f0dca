"""The drone delivery app with two test-only knobs, for the process tests
(``choreograph run --app tests.drone.chaos_app:create_app``).

``DRONE_TEST_SLOW_SERVICES`` (comma-separated service names) and ``DRONE_TEST_SLOW_SECONDS``:
every handler and join of those services sleeps that long before it runs, so that a process can
be killed in the middle of a handler while it holds messages.

``DRONE_TEST_RETRY_DELAY``: the simulated transient errors of package and drone-scheduler ask to
be retried after this many seconds (the example's own delay is 0.05 s), so that a restart can
happen while retries are pending.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from typing import Any

from choreograph import App, RetryLater
from choreograph.demo import create_app as create_drone_app
from choreograph.demo import drone_scheduler, package
from choreograph.demo.knobs import Knobs, chance


def _slowed(fn: Any, seconds: float) -> Any:
    async def slow(*args: Any) -> Any:
        await asyncio.sleep(seconds)
        return await fn(*args)

    slow.__name__ = fn.__name__
    return slow


def _maybe_fail_after(delay: float) -> Any:
    def maybe_fail(knobs: Knobs, service: str, delivery_id: str, attempt: int) -> None:
        if attempt <= 2 and chance(knobs.transient_error_rate, service, delivery_id, attempt):
            raise RetryLater(f"{service}: simulated transient error (attempt {attempt})",
                             delay=delay)  # fmt: skip

    return maybe_fail


def create_app() -> App:
    delay = os.environ.get("DRONE_TEST_RETRY_DELAY")
    if delay:
        for module in (package, drone_scheduler):
            module.maybe_fail = _maybe_fail_after(float(delay))  # type: ignore[attr-defined]
    app = create_drone_app()
    seconds = float(os.environ.get("DRONE_TEST_SLOW_SECONDS", "0"))
    names = [n for n in os.environ.get("DRONE_TEST_SLOW_SERVICES", "").split(",") if n]
    for name in names:
        service = app.service(name)
        for cls, spec in service.handlers.items():
            service.handlers[cls] = replace(spec, fn=_slowed(spec.fn, seconds))
        for key, join in service.joins.items():
            service.joins[key] = replace(join, fn=_slowed(join.fn, seconds))
    return app
