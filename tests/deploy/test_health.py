"""``choreograph run --health-port``: liveness, readiness and a graceful SIGTERM, on real
processes (embedded SQLite bus)."""

from __future__ import annotations

from pathlib import Path

from tests.deploy.apps import Parcel
from tests.deploy.support import APP, JOURNAL, handled, probe, publish, started
from tests.support.procs import Proc, Procs, free_port, wait_until


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
        publish(f"sqlite:///{tmp_path}/bus.db", [Parcel(number=1)], tmp_path)
        wait_until(lambda: started(journal, "counter"), 60, "the handling to start")
        # when it receives SIGTERM
        proc.popen.terminate()
        # then readiness turns false at once while liveness holds
        wait_until(lambda: probe(port, "/readyz")[0] == 503, 60, "/readyz to answer 503")
        assert probe(port, "/readyz") == (503, "draining\n") or not proc.alive()
        # and the message in hand is finished before a clean exit
        assert proc.wait(60) == 0, proc.output()
        assert handled(journal, "counter") == started(journal, "counter")
        assert "stopped cleanly" in proc.output()


def test_a_handler_outlasting_the_grace_period_is_left_for_its_lease(tmp_path: Path) -> None:
    # given a service whose handler holds its message far longer than the grace period
    port = free_port()
    journal = tmp_path / "journal.log"
    with Procs(tmp_path / "logs") as procs:
        proc = Procs.ready(
            run_counter(procs, tmp_path, port, "--grace-period", "1", "--lease", "2", hold=600),
            port,
        )
        publish(f"sqlite:///{tmp_path}/bus.db", [Parcel(number=1)], tmp_path)
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
