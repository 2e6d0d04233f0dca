"""Entry point of every benchmark child process: ``python -m benchmarks.child module:fn 'json'``.

A child talks to the driver with JSON lines on stdout prefixed with :data:`TAG`; anything else it
prints is ignored (but kept for error messages). ``fn`` is an async function taking the decoded
JSON object as keyword arguments.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import resource
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


def main() -> None:
    target, raw_args = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}"
    module_name, _, fn_name = target.partition(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    try:
        asyncio.run(fn(**json.loads(raw_args)))
    except KeyboardInterrupt:
        pass
    except BaseException as exc:
        emit("error", error=f"{type(exc).__name__}: {exc}")
        raise


if __name__ == "__main__":
    main()
