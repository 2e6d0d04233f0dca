"""Entry point of every benchmark child process: ``python -m benchmarks.child module:fn 'json'``.

A child talks to the driver with JSON lines on stdout prefixed with :data:`TAG`; anything else it
prints is ignored (but kept for error messages). ``fn`` is an async function taking the decoded
JSON object as keyword arguments. With ``BENCH_PROFILE=path`` in its environment the child runs
under cProfile and dumps its statistics to ``path`` when it ends.
"""

from __future__ import annotations

import asyncio
import cProfile
import importlib
import json
import os
import resource
import signal
import sys
import time
from typing import Any

TAG = "@@bench "


def emit(event: str, **fields: Any) -> None:
    """Send one message to the driver."""
    sys.stdout.write(TAG + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def cpu_now() -> float:
    """CPU seconds (user + system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Wall clock (shared by every process on the machine) and CPU of one measured phase."""

    def __init__(self) -> None:
        self.start = time.time()
        self._cpu = cpu_now()

    def cpu(self) -> float:
        return cpu_now() - self._cpu


async def wait_for_stdin_line() -> str:
    """Wait for the driver to write a line (e.g. ``go``) on our stdin."""
    return await asyncio.to_thread(sys.stdin.readline)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main() -> None:
    target, raw_args = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}"
    module_name, _, fn_name = target.partition(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that `finally` runs (and profiles dump)
    profile_path = os.environ.get("BENCH_PROFILE")
    profiler = cProfile.Profile() if profile_path else None
    try:
        if profiler is not None:
            profiler.enable()
        asyncio.run(fn(**json.loads(raw_args)))
    except KeyboardInterrupt:
        pass
    except BaseException as exc:
        emit("error", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if profiler is not None and profile_path:
            profiler.disable()
            profiler.dump_stats(profile_path)


if __name__ == "__main__":
    main()
