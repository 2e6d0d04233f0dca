"""When to try a failed handler again, and when to give up."""

from __future__ import annotations

import random
from dataclasses import dataclass

from choreograph.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Immediate retries first, then exponential backoff with jitter, up to ``max_attempts``.

    Attempt ``n`` (1-based) failed: if ``n >= max_attempts`` the handler gives up; otherwise the
    event is delivered again after :meth:`delay` seconds. Retries go through the transport, so a
    pending retry survives restarts.
    """

    max_attempts: int = 5
    immediate: int = 1
    """How many of the first retries happen at once, before any backoff."""
    base_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.2
    """Each delay is spread by up to this fraction either way, so retries of a burst scatter."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError("RetryPolicy.max_attempts must be at least 1")
        if self.immediate < 0 or self.base_delay < 0 or self.max_delay < 0:
            raise ConfigurationError("RetryPolicy delays and counts must not be negative")
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError("RetryPolicy.jitter must be between 0 and 1")

    def gives_up(self, attempt: int) -> bool:
        return attempt >= self.max_attempts

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1``."""
        if attempt <= self.immediate:
            return 0.0
        backoff = min(
            self.max_delay, self.base_delay * self.factor ** (attempt - self.immediate - 1)
        )
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, backoff * (1 + spread))


NO_RETRY = RetryPolicy(max_attempts=1)
DEFAULT_RETRY = RetryPolicy()
