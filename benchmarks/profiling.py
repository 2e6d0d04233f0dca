"""``--profile``: run the choreograph processes under cProfile and summarise where time goes.

Children of :mod:`benchmarks.child` profile themselves (``BENCH_PROFILE``); services started with
``choreograph run`` are started as ``python -m cProfile -o … -m choreograph run …`` (they stop
cleanly on SIGTERM, so the statistics are written). The summary lists, per profiled process, the
functions with the most time of their own, and the choreograph functions with the most cumulative
time. Profiling slows everything down: figures of a profiled run are not comparable.
"""

from __future__ import annotations

import io
import pstats
from pathlib import Path

from benchmarks.harness import PYTHON


def service_argv(profile_dir: Path | None, name: str, argv: list[str]) -> list[str]:
    """``argv`` of ``choreograph …`` (argv[0] is the script), profiled when asked."""
    if profile_dir is None:
        return argv
    path = profile_dir / f"{name}.prof"
    return [PYTHON, "-m", "cProfile", "-o", str(path), "-m", "choreograph", *argv[1:]]


def child_env(profile_dir: Path | None, name: str) -> dict[str, str]:
    return {} if profile_dir is None else {"BENCH_PROFILE": str(profile_dir / f"{name}.prof")}


def summarise(path: Path, top: int = 18) -> str:
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    own = pstats.Stats(str(path), stream=out)
    own.sort_stats("cumulative").print_stats(r"choreograph/", top)
    return out.getvalue()
