"""Failure knobs: make every path of the choreography reachable on demand.

Each knob is read from an environment variable (``DRONE_<NAME>``), so that services running in
separate processes share one setting, or passed explicitly (``choreograph demo --rejection-rate``).
Decisions are deterministic per delivery (a hash of its id), so a redelivered event takes the same
path, as a real service's business rules would.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, fields

from choreograph import ConfigurationError


@dataclass(frozen=True)
class Knobs:
    rejection_rate: float = 0.05
    """Share of packages the package service rejects."""
    transient_error_rate: float = 0.10
    """Share of first attempts (in package and drone-scheduler) that fail with a transient error."""
    slow_drone_rate: float = 0.0
    """Share of drone reservations answered only after ``slow_drone_seconds``."""
    slow_drone_seconds: float = 5.0
    silent_drone_scheduler: bool = False
    """The drone-scheduler consumes requests and never answers (a service dead in silence)."""
    fleet_size: int = 100
    flight_seconds: float = 0.2
    join_timeout: float = 10.0
    """How long delivery waits for both the package and the drone."""

    def __post_init__(self) -> None:
        for name in ("rejection_rate", "transient_error_rate", "slow_drone_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigurationError(f"knob {name} must be between 0 and 1, got {value}")
        if self.fleet_size < 1:
            raise ConfigurationError("knob fleet_size must be at least 1")
        for name in ("slow_drone_seconds", "flight_seconds", "join_timeout"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"knob {name} must not be negative")

    @classmethod
    def from_env(cls, **overrides: object) -> Knobs:
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = os.environ.get(f"DRONE_{field.name.upper()}")
            if raw is None:
                continue
            try:
                if field.type == "bool":
                    values[field.name] = raw.lower() in ("1", "true", "yes", "on")
                elif field.type == "int":
                    values[field.name] = int(raw)
                else:
                    values[field.name] = float(raw)
            except ValueError:
                raise ConfigurationError(
                    f"DRONE_{field.name.upper()}={raw!r} is not a valid {field.type}"
                ) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        return {f"DRONE_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self)}


def chance(rate: float, *salt: object) -> bool:
    """A deterministic coin toss for this delivery (and salt) that lands True with ``rate``."""
    if rate <= 0:
        return False
    digest = hashlib.blake2b("/".join(map(str, salt)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate
