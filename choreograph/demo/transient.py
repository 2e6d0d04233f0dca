"""The transient-error knob, shared by the services that can fail transiently."""

from __future__ import annotations

from choreograph import RetryLater
from choreograph.demo.knobs import Knobs, chance


def maybe_fail(knobs: Knobs, service: str, delivery_id: str, attempt: int) -> None:
    """Fail this attempt with a transient error when the knob says so (never after attempt 2,
    so that the default retry policy always gets through)."""
    if attempt <= 2 and chance(knobs.transient_error_rate, service, delivery_id, attempt):
        raise RetryLater(f"{service}: simulated transient error (attempt {attempt})", delay=0.05)
