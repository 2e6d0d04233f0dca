"""``choreograph record``: the recorder as its own process, fed by services that run with
``CHOREOGRAPH_RECORD=1``; ``choreograph trace`` reads what it wrote."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from choreograph.cli import main
from tests.support.procs import Procs

HELLO = "examples.hello:app"

pytestmark = pytest.mark.slow


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def handled(view: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(event type, service, outcome) of every handling in a ``trace --json`` view."""
    return {(e["type"], h["service"], h["outcome"]) for e in view["events"] for h in e["handlings"]}


def wait_for_trace(
    db: str, correlation_id: str, expected: set[tuple[str, str, str]], timeout: float = 60.0
) -> dict[str, Any]:
    """Poll ``choreograph trace --json`` until the transaction is recorded as completed with
    the ``expected`` handlings (reports arrive a little after the events)."""
    deadline = time.monotonic() + timeout
    while True:
        result = cli("trace", correlation_id, "--db", db, "--json")
        if result.exit_code == 0:
            view: dict[str, Any] = json.loads(result.output)
            if view["status"] == "completed" and expected <= handled(view):
                return view
        assert time.monotonic() < deadline, f"not recorded as completed: {result.output}"
        time.sleep(0.2)


def test_record_writes_every_event_and_handling_until_stopped(tmp_path: Path) -> None:
    bus, db = f"sqlite:///{tmp_path}/bus.db", f"sqlite:///{tmp_path}/flows.db"
    stores = f"sqlite:///{tmp_path}/{{service}}.db"
    with Procs(tmp_path / "logs", env={"CHOREOGRAPH_RECORD": "1"}) as procs:
        # given the recorder running in its own process, under its own group, keeping 7 days
        recorder = procs.start(
            "recorder",
            ["record", "--app", HELLO, "-t", bus, "--db", db, "--group", "rec", "--retain", "7d"],
        )
        recorder.wait_output("recording hello")
        # and both hello services, reporting their handlings
        for service in ("ping", "pong"):
            procs.run(HELLO, service, transport=bus, store=stores).wait_output("running")

        # when a Ping starts a transaction
        published = cli("publish", "Ping", '{"text": "hi"}', "--app", HELLO, "-t", bus,
                        "--correlation-id", "hello-1")  # fmt: skip
        assert published.exit_code == 0, published.output

        # then the recorder has the whole transaction: Ping handled by pong, Pong by ping
        expected = {("Ping", "pong", "done"), ("Pong", "ping", "done")}
        view = wait_for_trace(db, "hello-1", expected)
        assert [e["type"] for e in view["events"]] == ["Ping", "Pong"]

        # and it stops cleanly on SIGTERM, saying how much it recorded
        assert recorder.stop() == 0, recorder.output()
        assert "stopped;" in recorder.output()
        assert "0 messages recorded" not in recorder.output()


def test_record_refuses_a_bad_retain_duration(tmp_path: Path) -> None:
    result = cli(
        "record", "--app", HELLO, "-t", f"sqlite:///{tmp_path}/bus.db",
        "--db", f"sqlite:///{tmp_path}/flows.db", "--retain", "forever",
    )  # fmt: skip

    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)
    assert "forever" in result.output
