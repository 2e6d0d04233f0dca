"""The sizes of one benchmark run (``--quick`` shrinks them for a smoke run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Config:
    workdir: Path
    w1_events: int = 50_000
    w2_transactions: int = 10_000
    w2_rate: float = 500.0
    w2_seconds: float = 10.0
    w3_deliveries: int = 2_000
    w3_rate: float = 200.0
    w3_seconds: float = 10.0
    repeat: int = 1
    quick: bool = False
    profile_dir: Path | None = None
    """When set, choreograph processes run under cProfile and write their statistics here."""

    @classmethod
    def create(
        cls, workdir: Path, *, quick: bool, repeat: int = 1, profile_dir: Path | None = None
    ) -> Config:
        if quick:
            return cls(
                workdir,
                w1_events=5_000,
                w2_transactions=1_000,
                w2_seconds=3.0,
                w3_deliveries=300,
                w3_seconds=3.0,
                repeat=repeat,
                quick=True,
                profile_dir=profile_dir,
            )
        return cls(workdir, repeat=repeat, profile_dir=profile_dir)
