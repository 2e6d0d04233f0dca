"""Running child processes, reading their messages and CPU, and the rows the report shows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.child import TAG

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A cell could not be measured (a child failed, a broker is down, a timeout...)."""


@dataclass
class Row:
    """One line of a result table."""

    workload: str
    transport: str
    side: str
    rate: float | None = None
    """events/s (W1), transactions/s (W2), deliveries/s (W3)."""
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_s: float | None = None
    """CPU seconds of the measured processes (the driver excluded) during the throughput phase."""
    cpu_detail: str = ""
    ratio: str = ""
    note: str = ""
    error: str = ""
    baseline: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Proc:
    """One child process; its stdout is read continuously so that it can never block on it."""

    name: str
    process: asyncio.subprocess.Process
    _messages: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    _tail: deque[str] = field(default_factory=lambda: deque(maxlen=30))
    _lines: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    _reader: asyncio.Task[None] | None = None
    stderr_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def start_reading(self) -> None:
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line_bytes := await self.process.stdout.readline():
            line = line_bytes.decode(errors="replace").rstrip("\n")
            if line.startswith(TAG):
                message = json.loads(line[len(TAG) :])
                await self._messages.put(message)
            else:
                self._tail.append(line)
                await self._lines.put(line)
        await self._messages.put({"event": "exit"})

    def describe_failure(self) -> str:
        lines = list(self._tail)
        if self.stderr_path and self.stderr_path.exists():
            lines += self.stderr_path.read_text(errors="replace").splitlines()[-15:]
        return f"{self.name} (exit {self.process.returncode}): " + " | ".join(lines[-8:])

    async def message(self, event: str, timeout: float) -> dict[str, Any]:
        """Wait for the child's next message named ``event``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{self.name}: no '{event}' within {timeout:.0f}s")
            try:
                message = await asyncio.wait_for(self._messages.get(), remaining)
            except TimeoutError:
                raise BenchError(f"{self.name}: no '{event}' within {timeout:.0f}s") from None
            if message["event"] == event:
                return message
            if message["event"] == "error":
                raise BenchError(f"{self.name}: {message['error']}")
            if message["event"] == "exit":
                await self.process.wait()
                raise BenchError(self.describe_failure())

    async def output_containing(self, text: str, timeout: float) -> None:
        """Wait for a plain (untagged) output line containing ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if self.process.returncode is not None:
                raise BenchError(self.describe_failure())
            if remaining <= 0:
                raise BenchError(f"{self.name}: did not print {text!r} within {timeout:.0f}s")
            try:
                line = await asyncio.wait_for(self._lines.get(), min(remaining, 0.5))
            except TimeoutError:
                continue
            if text in line:
                return

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) the process has used so far, read from /proc."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK

    async def exited(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to end by itself."""
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float = 15.0) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 2)


class Processes:
    """The children of one benchmark cell; all are stopped when the cell ends, even on error."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.children: list[Proc] = []

    async def spawn(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> Proc:
        stderr_path = self.workdir / f"{name}.{len(self.children)}.stderr"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        with stderr_path.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=str(self.workdir),
                env=full_env,
            )
        proc = Proc(name, process, stderr_path=stderr_path)
        proc.start_reading()
        self.children.append(proc)
        return proc

    async def child(
        self, name: str, target: str, args: dict[str, Any], env: dict[str, str] | None = None
    ) -> Proc:
        """Start ``python -m benchmarks.child target json(args)``."""
        argv = [PYTHON, "-m", "benchmarks.child", target, json.dumps(args)]
        return await self.spawn(name, argv, env)

    async def stop_all(self) -> None:
        await asyncio.gather(*(p.stop() for p in reversed(self.children)))


@contextlib.asynccontextmanager
async def processes(workdir: Path) -> AsyncIterator[Processes]:
    procs = Processes(workdir)
    try:
        yield procs
    finally:
        await procs.stop_all()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values (nearest rank)."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def latency_summary(latencies_s: Sequence[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    values = sorted(latencies_s)
    return percentile(values, 0.50) * 1000, percentile(values, 0.99) * 1000
