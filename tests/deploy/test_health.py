"""``choreograph run --health-port``: liveness, readiness and a graceful SIGTERM, on real
processes (embedded SQLite bus)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.deploy.apps import Parcel
from tests.deploy.support import APP, JOURNAL, handled, probe, publish, started
from tests.support.nats_cluster import NATS_SERVER, require_nats_server
from tests.support.procs import Proc, Procs, free_port, port_open, wait_until


def run_counter(procs: Procs, tmp_path: Path, port: int, *options: str, hold: float = 0.0) -> Proc:
    return procs.run(
        APP,
        "counter",
        transport=f"sqlite:///{tmp_path}/bus.db",
        store=f"sqlite:///{tmp_path}/{{service}}.db",
        options=["--health-port", str(port), *JOURNAL, *options],
        env={"PROCS_JOURNAL": str(tmp_path / "journal.log"), "DEPLOY_HOLD_SECONDS": str(hold)},
    )


def test_healthz_and_readyz_answer_once_running(tmp_path: Path) -> None:
    # given a service running with a health port
    port = free_port()
    with Procs(tmp_path / "logs") as procs:
        proc = Procs.ready(run_counter(procs, tmp_path, port), port)
        # when the probes ask
        live = probe(port, "/healthz")
        ready = probe(port, "/readyz")
        other = probe(port, "/metrics")
        # then it is alive and ready, and says what it serves elsewhere
        assert live == (200, "ok\n"), proc.output()
        assert ready == (200, "ready\n"), proc.output()
        assert other[0] == 404 and "/readyz" in other[1]
        assert proc.stop() == 0


def test_health_port_from_the_environment(tmp_path: Path) -> None:
    # given the port in CHOREOGRAPH_HEALTH_PORT rather than an option
    port = free_port()
    with Procs(tmp_path / "logs") as procs:
        proc = procs.run(APP, "counter", transport=f"sqlite:///{tmp_path}/bus.db",
                         store=f"sqlite:///{tmp_path}/{{service}}.db",
                         env={"CHOREOGRAPH_HEALTH_PORT": str(port)})  # fmt: skip
        # when it runs, then the endpoint answers on that port
        Procs.ready(proc, port)
        assert probe(port, "/readyz") == (200, "ready\n")
        assert proc.stop() == 0


def test_sigterm_turns_not_ready_finishes_what_it_holds_and_exits(tmp_path: Path) -> None:
    # given a service holding a message (its handler takes 4 s)
    port = free_port()
    journal = tmp_path / "journal.log"
    with Procs(tmp_path / "logs") as procs:
        proc = Procs.ready(run_counter(procs, tmp_path, port, hold=4.0), port)
        publish(f"sqlite:///{tmp_path}/bus.db", [Parcel(number=1)])
        wait_until(lambda: started(journal, "counter"), 60, "the handling to start")
        # when it receives SIGTERM
        proc.popen.terminate()
        # then readiness turns false at once while liveness holds
        wait_until(lambda: probe(port, "/readyz")[0] == 503, 60, "/readyz to answer 503")
        assert probe(port, "/readyz") == (503, "draining\n") or not proc.alive()
        # and it takes no new message: one published now waits for the next replica
        first = started(journal, "counter")
        publish(f"sqlite:///{tmp_path}/bus.db", [Parcel(number=2)])
        # and the message in hand is finished before a clean exit
        assert proc.wait(60) == 0, proc.output()
        assert handled(journal, "counter") == started(journal, "counter") == first
        assert "stopped cleanly" in proc.output()
        second = Procs.ready(run_counter(procs, tmp_path, free_port()))
        wait_until(lambda: len(handled(journal, "counter")) == 2, 60, "the second event handled")
        assert second.stop() == 0


def test_a_handler_outlasting_the_grace_period_is_left_for_its_lease(tmp_path: Path) -> None:
    # given a service whose handler holds its message far longer than the grace period
    port = free_port()
    journal = tmp_path / "journal.log"
    with Procs(tmp_path / "logs") as procs:
        proc = Procs.ready(
            run_counter(procs, tmp_path, port, "--grace-period", "1", "--lease", "2", hold=600),
            port,
        )
        publish(f"sqlite:///{tmp_path}/bus.db", [Parcel(number=1)])
        wait_until(lambda: started(journal, "counter"), 60, "the handling to start")
        # when it receives SIGTERM
        proc.popen.terminate()
        # then it exits with code 1 once the grace period is over, saying so
        assert proc.wait(60) == 1, proc.output()
        assert "not drained within the grace period of 1s" in proc.output()
        assert handled(journal, "counter") == set()
        # and the message is not lost: the next replica handles it after its lease
        second = Procs.ready(run_counter(procs, tmp_path, free_port(), "--lease", "2"))
        wait_until(lambda: handled(journal, "counter") == started(journal, "counter"), 60,
                   "the next replica to handle the message")  # fmt: skip
        assert len(handled(journal, "counter")) == 1
        assert second.stop() == 0


def test_bad_requests_get_an_answer_and_the_process_keeps_serving(tmp_path: Path) -> None:
    # given a running service with a health port
    port = free_port()
    with Procs(tmp_path / "logs") as procs:
        proc = Procs.ready(run_counter(procs, tmp_path, port), port)
        # when clients send what is not a probe
        answers = [
            raw(port, b"\x00\xff garbage\r\n\r\n"),
            raw(port, b"POST /readyz HTTP/1.1\r\n\r\n"),
            raw(port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n"),
            raw(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
            raw(port, b"GET /readyz"),  # closed before the line ends
        ]
        # then each gets a clear status, and the probes still answer
        assert answers[0].startswith(b"HTTP/1.1 400 ")
        assert answers[1].startswith(b"HTTP/1.1 405 ")
        assert answers[2].startswith(b"HTTP/1.1 400 ")
        assert answers[3].startswith(b"HTTP/1.1 200 ") and answers[3].endswith(b"\r\n\r\n")
        assert answers[4].startswith(b"HTTP/1.1 400 ")
        assert probe(port, "/readyz") == (200, "ready\n")
        assert proc.alive()
        assert proc.stop() == 0


def raw(port: int, request: bytes) -> bytes:
    """What the server answers to ``request`` sent as is (the write side is then closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.nats
def test_readyz_turns_503_when_the_bus_goes_away(tmp_path: Path) -> None:
    # given a service on a nats-server of the test's own, ready
    require_nats_server()
    nats_port, port = free_port(), free_port()
    server = subprocess.Popen(
        [NATS_SERVER, "-a", "127.0.0.1", "-p", str(nats_port), "-js", "-sd", str(tmp_path / "js")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open(nats_port), 30, "nats-server to listen")
        with Procs(tmp_path / "logs") as procs:
            proc = procs.run(APP, "counter", transport=f"nats://127.0.0.1:{nats_port}?namespace=h",
                             store=f"sqlite:///{tmp_path}/{{service}}.db",
                             options=["--health-port", str(port)])  # fmt: skip
            Procs.ready(proc, port)
            wait_until(lambda: probe(port, "/readyz") == (200, "ready\n"), 60, "ready")
            # when the bus stops
            server.terminate()
            server.wait(30)
            # then the process is alive but not ready, and says why
            wait_until(lambda: probe(port, "/readyz")[0] == 503, 60, "/readyz to answer 503")
            assert "bus" in probe(port, "/readyz")[1]
            assert probe(port, "/healthz") == (200, "ok\n")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)


def test_a_health_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    # given the health port taken by another program
    with socket.socket() as taken, Procs(tmp_path / "logs") as procs:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # when a service is started on it
        proc = run_counter(procs, tmp_path, port)
        # then it exits 1 with one line naming the address, before running anything
        assert proc.wait(60) == 1
        assert f"cannot serve health on 127.0.0.1:{port}" in proc.output()
        assert "Traceback" not in proc.output()
        assert "running " not in proc.output()
