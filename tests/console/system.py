"""A running drone delivery for the console's tests: the services in a background thread (their
own event loop), recording into a flow database, with a fault switch, and the console as a
separate process reading the same files, as an operator would run it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx

from choreograph import Context, Middleware, PermanentFailure, Runtime
from choreograph.demo import create_app
from choreograph.demo.ingestion import create_http_app
from choreograph.demo.knobs import Knobs
from choreograph.events import Event
from choreograph.middleware import Next
from choreograph.observe.recorder import Recorder, RecorderMiddleware

T = TypeVar("T")
APP = "choreograph.demo:create_app"
#: The services run with this join timeout; the console's own copy of the declarations says 10 s.
SERVICE_JOIN_TIMEOUT = 300.0


class Faults(Middleware):
    """Makes ``delivery.complete_delivery`` fail for good for the deliveries in ``grounded``: the
    landing is dead-lettered while the delivery stays in flight, until a replay."""

    def __init__(self) -> None:
        self.grounded: set[str] = set()

    async def around_handle(self, ctx: Context, call_next: Next) -> list[Event]:
        if ctx.handler == "complete_delivery" and ctx.correlation_id in self.grounded:
            raise PermanentFailure("flight computer lost the landing report (test fault)")
        return await call_next()


class LiveSystem:
    """The drone delivery on an SQLite bus in ``root``, recorded into ``root/flows.db``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bus_url = f"sqlite:///{root}/bus.db"
        self.store_url = f"sqlite:///{root}/{{service}}.db"
        self.db_url = f"sqlite:///{root}/flows.db"
        self.faults = Faults()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runtime: Runtime | None = None
        self._recorder: Recorder | None = None
        self._client: httpx.AsyncClient | None = None

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        self._thread.start()
        self.call(self._start())

    async def _start(self) -> None:
        knobs = Knobs(rejection_rate=0.0, transient_error_rate=0.3, flight_seconds=0.3,
                      join_timeout=SERVICE_JOIN_TIMEOUT)  # fmt: skip
        app = create_app(knobs)
        self._runtime = Runtime(
            app, transport=self.bus_url, store=self.store_url,
            middleware=[RecorderMiddleware(flush_interval=0.1, heartbeat_interval=1.0),
                        self.faults],
        )  # fmt: skip
        await self._runtime.start()
        self._recorder = Recorder(app, self._runtime.transport, self.db_url, poll_interval=0.1)
        await self._recorder.start()
        self._client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_http_app(self._runtime)),
            base_url="http://ingestion",
        )

    def submit(self, delivery_id: str, *, weight_kg: float = 2.0) -> None:
        """Request one delivery through the HTTP API (40 kg and more is rejected)."""
        body = {
            "delivery_id": delivery_id, "owner_id": "owner-1",
            "pickup": {"latitude": 47.6, "longitude": -122.3},
            "dropoff": {"latitude": 47.7, "longitude": -122.2},
            "package": {"package_id": f"p-{delivery_id}", "size": "small",
                        "weight_kg": weight_kg},
        }  # fmt: skip

        async def post() -> None:
            assert self._client is not None
            response = await self._client.post("/api/deliveryrequests", json=body)
            assert response.status_code == 202, response.text

        self.call(post())

    def outcome(self, delivery_id: str) -> str | None:
        """The recorded outcome of a delivery: completed, failed, or None while in flight."""

        async def read() -> str | None:
            assert self._recorder is not None
            rows = await self._recorder.db.fetch(
                "SELECT outcome FROM cg_transactions WHERE correlation_id = ?", (delivery_id,)
            )
            return rows[0]["outcome"] if rows else None

        return self.call(read())

    def wait(self, check: Any, what: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def dead_letters(self) -> list[Any]:
        assert self._runtime is not None
        return self.call(self._runtime.transport.dead_letters(limit=1000))

    def stop(self) -> None:
        async def stop() -> None:
            if self._client is not None:
                await self._client.aclose()
            if self._recorder is not None:
                await self._recorder.stop()
            if self._runtime is not None:
                await self._runtime.stop()

        try:
            self.call(stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ConsoleProcess:
    """``choreograph console`` in its own process, stopped by its PID."""

    def __init__(self, system: LiveSystem, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = system.root / f"console-{self.port}.log"
        command = [
            sys.executable, "-m", "choreograph", "console", "--db", system.db_url, "--app", APP,
            "--transport", system.bus_url, "--store", system.store_url, "--port", str(self.port),
            "--stuck-after", "120s", *args,
        ]  # fmt: skip
        environment = {k: v for k, v in os.environ.items() if not k.startswith("DRONE_")}
        environment.update(env or {})
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=environment)  # fmt: skip

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the console exited: {self.output()}")
            try:
                httpx.get(self.base_url + "/static/console.css", timeout=2.0)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"the console did not start: {self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
