"""The broker servers on this machine: where they listen, whether they are up, how to restart them.

Tests that need a server skip with a clear reason when it is down, except under ``CI=true``, where
they fail: CI must never go green by skipping.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Broker:
    name: str
    port: int
    start: str
    stop: str

    def is_up(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def require(self) -> None:
        """Skip (locally) or fail (under CI) the calling test when the server is down."""
        if self.is_up():
            return
        message = f"{self.name} is not reachable on 127.0.0.1:{self.port} (start it: {self.start})"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)

    def stop_server(self) -> None:
        subprocess.run(self.stop, shell=True, check=False, capture_output=True, timeout=120)
        wait_until(lambda: not self.is_up(), 60, f"{self.name} to stop")

    def start_server(self) -> None:
        subprocess.run(self.start, shell=True, check=False, capture_output=True, timeout=120)
        wait_until(self.is_up, 120, f"{self.name} to start")


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


NATS = Broker(
    "NATS JetStream",
    4222,
    start=(
        "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- "
        "-a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log"
    ),
    stop="pkill -INT -x nats-server",
)
REDIS = Broker(
    "Redis",
    6379,
    start=(
        # With the append-only file on: restart tests turn it on before stopping the server.
        'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
        "--appendonly yes --appendfsync always --dir /var/lib/redis "
        "--logfile /var/log/redis/ci.log"
    ),
    stop="redis-cli -p 6379 shutdown nosave",
)
RABBITMQ = Broker(
    "RabbitMQ",
    5672,
    start=f"bash {_SCRIPTS}/start-rabbitmq.sh",  # with room for file handles
    stop="rabbitmqctl stop",
)
POSTGRES = Broker(
    "PostgreSQL",
    5432,
    start="pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    stop="pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main stop",
)

BROKERS = {"nats": NATS, "redis": REDIS, "amqp": RABBITMQ, "postgres": POSTGRES}
