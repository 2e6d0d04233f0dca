"""Durations as people read them, the same in the CLI and the console."""

from __future__ import annotations


def format_duration(value: float) -> str:
    """``value`` seconds in the largest unit that keeps it short: ``850µs``, ``12.5ms``,
    ``3.25s``, ``4.2m``, ``2.5h``, ``3.0d``."""
    if value < 0.001:
        return f"{value * 1_000_000:.0f}µs"
    if value < 1:
        return f"{value * 1000:.1f}ms"
    if value < 120:
        return f"{value:.2f}s"
    if value < 7200:
        return f"{value / 60:.1f}m"
    if value < 172_800:
        return f"{value / 3600:.1f}h"
    return f"{value / 86_400:.1f}d"
