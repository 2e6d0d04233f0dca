"""Start, stop and kill ``choreograph`` commands in their own OS processes, for system tests.

::

    with Procs(tmp_path) as procs:
        bus = procs.run("choreograph.demo:create_app", "package",
                        transport=f"sqlite:///{tmp_path}/bus.db",
                        store=f"sqlite:///{tmp_path}/{{service}}.db")
        ...
        bus.kill()          # SIGKILL, no clean-up: the crash case
        bus.stop()          # SIGTERM, then wait: the graceful case; returns the exit code

Every process started through a :class:`Procs` is killed (by its own pid) when the block ends,
whatever happened. Output goes to a log file per process, shown by :meth:`Proc.output` (and in
assertion messages) so a failing test says what the process said.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def choreograph_command() -> list[str]:
    """The ``choreograph`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("choreograph")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from choreograph.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.05) -> None:  # fmt: skip
    """Poll ``predicate`` until it is truthy; raise TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without DRONE_* / CHOREOGRAPH_* settings, plus ``extra``; the repo
    is on the path so ``examples`` and ``tests`` modules import."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DRONE_", "CHOREOGRAPH_"))}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "200"
    env.update(extra or {})
    return env


@dataclass
class Proc:
    """One started command."""

    name: str
    args: list[str]
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_output(self, marker: str, timeout: float = 20.0) -> None:
        """Wait until ``marker`` appears in the output; fail early if the process exits."""

        def seen() -> bool:
            if marker in self.output():
                return True
            if not self.alive():
                raise AssertionError(
                    f"{self.name} exited with {self.popen.returncode} before printing "
                    f"{marker!r}:\n{self.output()}"
                )
            return False

        wait_until(seen, timeout, f"{self.name} to print {marker!r}")

    def wait_port(self, port: int, timeout: float = 20.0) -> None:
        def listening() -> bool:
            if not self.alive():
                raise AssertionError(f"{self.name} exited early:\n{self.output()}")
            return port_open(port)

        wait_until(listening, timeout, f"{self.name} to listen on {port}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait for the exit; SIGKILL if it does not come. Returns the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not stop within {timeout}s of SIGTERM:\n{self.output()}"
            ) from None

    def kill(self) -> int:
        """SIGKILL: the process dies at once, holding whatever it held."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        return self.popen.wait(10)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout}s:\n{self.output()[-3000:]}"
            ) from None


@dataclass
class Procs:
    """Starts commands and guarantees they end with the block."""

    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment for every process started here (e.g. DRONE_* knobs)."""
    started: list[Proc] = field(default_factory=list)

    def __enter__(self) -> Procs:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in self.started:
            if proc.alive():
                proc.kill()

    def start(self, name: str, args: Iterable[str], env: Mapping[str, str] | None = None) -> Proc:
        """Start ``args`` (a ``choreograph`` sub-command and its options) as ``name``."""
        argv = [*choreograph_command(), *args]
        log = self.log_dir / f"{name}-{len(self.started)}.log"
        with log.open("wb") as sink:
            popen = subprocess.Popen(
                argv,
                cwd=REPO,
                env=clean_env({**self.env, **(env or {})}),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        proc = Proc(name, argv, popen, log)
        self.started.append(proc)
        return proc

    def run(
        self,
        app: str,
        service: str,
        *,
        transport: str,
        store: str,
        lease: float | None = None,
        asgi: str | None = None,
        port: int | None = None,
        options: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        """``choreograph run --app APP --service SERVICE ...``; returns at once (see
        :meth:`ready`)."""
        args = ["run", "--app", app, "--service", service, "--transport", transport,
                "--store", store]  # fmt: skip
        if lease is not None:
            args += ["--lease", str(lease)]
        if asgi is not None:
            args += ["--asgi", asgi, "--port", str(port or free_port())]
        args += list(options)
        return self.start(service, args, env)

    @staticmethod
    def ready(proc: Proc, port: int | None = None, timeout: float = 30.0) -> Proc:
        """Wait until ``choreograph run`` runs its services (and listens on ``port``)."""
        proc.wait_output("running ", timeout)
        if port is not None:
            proc.wait_port(port, timeout)
        return proc


# A journal of what a process handled, to see from outside what it held when it was killed ------

JOURNAL_ENV = "PROCS_JOURNAL"
"""Environment variable naming the file :func:`journal` appends to."""


def _token(value: object) -> str:
    """One whitespace-free field of a journal line (a hostile id must not split the line)."""
    text = str(value)[:200] or "-"
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in text)


def journal() -> Any:
    """``--middleware tests.support.procs:journal``: a middleware appending, to the file named by
    ``$PROCS_JOURNAL``, one line when a handling starts (``start``) and one after its batch was
    committed and settled (``end``): ``<kind> <epoch seconds> <service> <event id> <attempt>
    [<outcome> <event type, or timer:NAME for a timer's expiry> <correlation id>]``. Each line
    is written (not buffered) at once, so it survives a SIGKILL."""
    from choreograph.middleware import Middleware

    path = Path(os.environ[JOURNAL_ENV])

    class Journal(Middleware):
        def _write(self, *fields: object) -> None:
            with path.open("a") as sink:
                sink.write(" ".join(map(_token, fields)) + "\n")

        async def around_handle(self, ctx: Any, call_next: Any) -> Any:
            self._write("start", f"{time.time():.6f}", ctx.service, ctx.event_id, ctx.attempt)
            return await call_next()

        def on_outcome(self, ctx: Any, outcome: Any) -> None:
            timer = ctx.extras.get("timer")  # a timer's expiry, not a handling of the event
            kind = f"timer:{timer}" if timer else ctx.envelope.type
            self._write("end", f"{time.time():.6f}", ctx.service, ctx.event_id, ctx.attempt,
                        outcome.kind, kind, ctx.correlation_id)  # fmt: skip

    return Journal()


@dataclass
class JournalEntry:
    kind: str
    at: float
    service: str
    event_id: str
    attempt: int
    outcome: str = ""
    event_type: str = ""
    correlation_id: str = ""


def read_journal(path: Path) -> list[JournalEntry]:
    """The complete lines of a :func:`journal` file (a torn last line is left out)."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[0] not in ("start", "end"):
            continue
        try:
            extra = [*fields[5:8], "", "", ""][:3]
            entries.append(JournalEntry(fields[0], float(fields[1]), fields[2], fields[3],
                                        int(fields[4]), *extra))  # fmt: skip
        except ValueError:
            continue
    return entries


def unfinished(entries: Iterable[JournalEntry]) -> dict[str, JournalEntry]:
    """Event ids whose latest handling started and did not end, with that start."""
    open_: dict[str, JournalEntry] = {}
    for entry in entries:
        if entry.kind == "start":
            open_[entry.event_id] = entry
        else:
            open_.pop(entry.event_id, None)
    return open_
