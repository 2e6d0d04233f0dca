"""Liveness and readiness over HTTP for an orchestrator's probes (``choreograph run
--health-port``).

* ``GET /healthz`` answers ``200 ok`` while the process runs. It is answered on the event loop
  that runs the services, so an answer also says that loop is responsive: a loop blocked by a
  handler leaves the probe unanswered and the orchestrator's timeout restarts the process.
* ``GET /readyz`` answers ``200 ready`` when the runtime has started (connected to the bus,
  groups declared, every service's store opened), the bus and each store answer now, and the
  process is not draining; ``503`` with the reason otherwise.

The server is a few lines on :func:`asyncio.start_server` rather than a web framework: it must
run on the services' own event loop (that is what liveness measures) and without any extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from choreograph.errors import ConfigurationError

if TYPE_CHECKING:
    from choreograph.runtime.runner import Runtime

log = logging.getLogger("choreograph.health")

#: Seconds a readiness check waits for the bus or a store before calling it unreachable.
CHECK_TIMEOUT = 2.0
_MAX_REQUEST_LINE = 8192


class HealthServer:
    """Serves ``/healthz`` and ``/readyz`` for ``runtime`` on ``host:port`` (port 0: any free
    port, see :attr:`port`). Call :meth:`drain` when shutdown begins: readiness turns false at
    once, so the orchestrator stops routing to the process while it finishes its messages."""

    def __init__(self, runtime: Runtime, host: str = "127.0.0.1", port: int = 0) -> None:
        self.runtime = runtime
        self.host = host
        self.requested_port = port
        self.draining = False
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The port listened on (the one chosen when 0 was asked)."""
        if self._server is None or not self._server.sockets:
            return self.requested_port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._answer, self.host, self.requested_port)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve health on {self.host}:{self.requested_port}: {exc.strerror or exc}"
            ) from None
        log.info("health on http://%s:%d/healthz and /readyz", self.host, self.port)

    def drain(self) -> None:
        self.draining = True

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def readiness(self) -> tuple[bool, str]:
        """(ready, reason): what ``/readyz`` answers."""
        if self.draining:
            return False, "draining"
        runtime = self.runtime
        if not runtime.started:
            return False, "starting"
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                for name, worker in list(runtime.workers.items()):
                    try:
                        async with worker.store.transaction():
                            pass
                    except Exception as exc:
                        return False, f"store of {name} unreachable: {type(exc).__name__}"
                    try:
                        await runtime.transport.lag(name)
                    except Exception as exc:
                        return False, f"bus unreachable: {type(exc).__name__}"
        except TimeoutError:
            return False, "bus or store did not answer in time"
        return True, "ready"

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT * 2):
                line = await reader.readuntil(b"\n")
                # The headers are read and ignored: a probe sends a handful.
                while (await reader.readuntil(b"\n")).strip():
                    pass
            method, status, text = await self._route(line[:_MAX_REQUEST_LINE])
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            method, status, text = "", 400, "bad request"
        except ConnectionError:
            writer.close()
            return
        full = (text + "\n").encode()
        body = b"" if method == "HEAD" else full  # HEAD: the length of what GET would send
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(full)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    async def _route(self, request_line: bytes) -> tuple[str, int, str]:
        """(method, status, text) answering one request line."""
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "", 400, "bad request"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return method, 405, "only GET"
        if target == "/healthz":
            return method, 200, "ok"
        if target == "/readyz":
            ready, reason = await self.readiness()
            return method, (200 if ready else 503), reason
        return method, 404, "not found: /healthz and /readyz are served"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
