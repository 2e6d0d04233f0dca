"""The sizes of one benchmark run (``--quick`` shrinks them for a smoke run), and the W3
variants it measures."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    w3_layouts: tuple[str, ...] = ("one", "each")
    w3_stores: tuple[str, ...] = ("sqlite", "postgres")
    w3_replicas: tuple[int, ...] = (1,)
    """Processes per service in the process-per-service layout."""
    w3_io_wait_ms: tuple[float, ...] = (0.0,)
    w3_lockings: tuple[str, ...] = ("",)
    w3_lanes: tuple[int, ...] = (0,)
    """Batches in flight per service process (0: ``choreograph run``'s default)."""
    """PostgreSQL store locking options to compare ('' is the store's default)."""
    repeat: int = 1
    quick: bool = False
    profile_dir: Path | None = None
    """When set, choreograph processes run under cProfile and write their statistics here."""

    @classmethod
    def create(
        cls,
        workdir: Path,
        *,
        quick: bool,
        repeat: int = 1,
        profile_dir: Path | None = None,
        **overrides: Any,
    ) -> Config:
        """``overrides`` replace fields (None leaves the size of the run)."""
        if quick:
            cfg = cls(
                workdir,
                w1_events=5_000,
                w2_transactions=1_000,
                w2_seconds=3.0,
                w3_deliveries=300,
                w3_seconds=3.0,
                w3_stores=("sqlite",),
                repeat=repeat,
                quick=True,
                profile_dir=profile_dir,
            )
        else:
            cfg = cls(workdir, repeat=repeat, profile_dir=profile_dir)
        return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
