"""``make chaos`` in small: the drone delivery, process per service, under SIGKILLs and poison on
the sqlite bus; and the accounting that decides its exit code."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from chaos.__main__ import main
from chaos.poison import CATALOGUE
from chaos.report import failures, print_report
from chaos.run import ChaosConfig, ChaosResult, Kill, recovery_times, run_chaos
from chaos.system import sqlite_setup


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_small_run_under_kills_and_poison_loses_nothing(tmp_path: Path) -> None:
    # given 150 deliveries, three SIGKILLs of service processes and two rounds of every poison
    config = ChaosConfig(deliveries=150, rate=30, kills=3, poison_rounds=2, stall_seconds=60)
    with sqlite_setup(tmp_path) as (bus, stores, _):
        # when the run ends by itself
        result = await run_chaos(config, tmp_path, bus, stores)

    # then every accepted delivery ended, once, with nothing held, no stall and no crash
    console = Console(record=True, width=200)
    print_report(result, console)
    table = console.export_text()
    assert failures(result) == [], table
    assert len(result.accepted) == 150, table
    assert result.terminal == 150 and result.lost == 0, table
    assert result.ledger.applied_twice == 0 and result.ledger.handled > 150 * 5, table
    assert result.snapshot.drones_reserved == result.snapshot.packages_unreleased == 0, table
    # and the kills happened, and every poison message was dead-lettered by every group
    assert [k.kind for k in result.kills] == ["member"] * 3, table
    assert len(result.poison) == 2 * len(CATALOGUE) and not result.poison_unaccounted, table
    assert set(result.poison_dead) == {p.kind for p in CATALOGUE}, table
    assert result.dead_letters["payload too large"] >= 2 * 3, table
    for row in ("accepted", "terminal", "lost", "applied twice", "held", "dead letters",
                "crashes", "recovery (service kill)"):  # fmt: skip
        assert row in table


def _result(**changes: object) -> ChaosResult:
    result = ChaosResult(ChaosConfig(deliveries=2), accepted={"a", "b"})
    result.statuses = {"a": "completed", "b": "failed"}
    for name, value in changes.items():
        setattr(result, name, value)
    return result


def test_the_verdict_names_every_kind_of_failure() -> None:
    # given a run where everything went well, then it passes
    assert failures(_result()) == []
    # given each kind of failure alone, then it fails and says why
    lost = _result(statuses={"a": "completed", "b": "requested"})
    assert failures(lost) == ["1 accepted deliveries never ended"]
    stalled = _result(stalled="no delivery ended for 90 s")
    assert failures(stalled) == ["stall: no delivery ended for 90 s"]
    crashed = _result(unexpected_exits=[("package#1", 1)])
    assert failures(crashed) == ["1 processes crashed or did not stop cleanly"]
    held = _result()
    held.snapshot.drones_reserved = 2
    assert failures(held) == ["2 resources held after their delivery ended"]
    twice = _result()
    twice.ledger.twice = ["package e1 DeliveryRequested"]
    assert failures(twice) == ["1 effects applied twice"]


def test_recovery_is_the_time_until_deliveries_end_at_80_percent_of_the_rate_before() -> None:
    # given 10 deliveries a second, nothing for 3 s after a kill at t=10, then 10 a second again
    samples: list[tuple[float, int]] = []
    total = 0
    for tenth in range(0, 300, 5):
        t = tenth / 10
        if not 10 <= t < 13:
            total += 5
        samples.append((t, total))
    result = _result(samples=samples, kills=[Kill(10.0, "package#1", "member")])
    result.accepted = {str(n) for n in range(10_000)}
    # then the recovery is measured from the kill to the first window back at the rate
    [recovery] = recovery_times(result)
    assert recovery is not None and 2.0 <= recovery <= 3.0


def test_the_command_refuses_nonsense_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--deliveries", "0"])
    assert exit_info.value.code == 2
    assert "--deliveries and --rate must be positive" in capsys.readouterr().err
