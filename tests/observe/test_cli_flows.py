"""``choreograph trace``, ``stuck`` and ``stats`` on a recorded completed, failed-and-compensated
and stuck transaction, as text and as JSON."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from choreograph import Runtime, transport_from_url
from choreograph.cli import main
from choreograph.observe.recorder import Recorder, RecorderMiddleware
from choreograph.transports.memory import MemoryTransport
from tests.observe.conftest import place
from tests.observe.shop import build_app
from tests.support.quiet import wait_until_quiet

APP = "tests.observe.shop:app"


async def _record(db_url: str) -> None:
    transport = transport_from_url("memory://")
    await transport.connect()
    app = build_app()
    recorder = Recorder(app, transport, db_url, poll_interval=0.02)
    await recorder.start()
    reports = RecorderMiddleware(flush_interval=0.02)
    async with Runtime(app, transport=transport, store="memory://", middleware=[reports]) as rt:
        await place(rt, "o-ok", sku="flaky")
        await place(rt, "o-bad", sku="declined")
        await place(rt, "o-stuck", sku="silent")
        # wait until every handling is done (o-stuck stays open: its drone never answers) and
        # every report is recorded
        assert isinstance(transport, MemoryTransport)
        await wait_until_quiet(rt, transport)
        await reports.flush()
        await wait_until_quiet(rt, transport, groups=[recorder.group])
        await recorder.idle()
    await recorder.stop()


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("flows") / "flows.db"
    url = f"sqlite:///{path}"
    asyncio.run(_record(url))
    return url


def cli(*args: str) -> Result:
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, list(args), catch_exceptions=False)


def test_trace_of_a_completed_transaction_shows_the_retry_and_the_join(db_url: str) -> None:
    result = cli("trace", "o-ok", "--db", db_url, "--app", APP)

    assert result.exit_code == 0, result.output
    out = result.output
    assert "o-ok" in out and "completed (OrderShipped)" in out
    assert "stock.reserve  ↻ retry  attempt 1" in out and "RetryLater: warehouse busy" in out
    assert "stock.reserve  ✓ done  attempt 2" in out
    assert "shipping.ship (join)  ✓ done" in out and "→ OrderShipped" in out
    assert "Waiting for" not in out


def test_trace_of_a_failed_transaction_shows_the_compensations(db_url: str) -> None:
    out = cli("trace", "o-bad", "--db", db_url, "--app", APP).output

    assert "failed (OrderFailed)" in out and "2 compensations" in out
    assert "stock.release (compensation)  ✓ done" in out
    assert "payment.refund (compensation)  ✓ done" in out


def test_trace_of_a_stuck_transaction_says_where_it_waits(db_url: str) -> None:
    out = cli("trace", "o-stuck", "--db", db_url, "--app", APP).output

    assert "in flight" in out
    assert "! silent  stock.reserve (handler)  emitted none of StockReserved" in out
    assert "Waiting for:" in out
    assert "shipping.ship (join): has PaymentCharged; waiting for StockReserved" in out


def test_trace_as_json(db_url: str) -> None:
    result = cli("trace", "o-bad", "--db", db_url, "--app", APP, "--json")

    view = json.loads(result.output)
    assert view["status"] == "failed" and view["terminal"] == "OrderFailed"
    assert view["events"][0]["type"] == "OrderPlaced"
    kinds = {
        (h["service"], h["kind"], h["outcome"]) for e in view["events"] for h in e["handlings"]
    }
    assert ("stock", "compensation", "done") in kinds and (
        "payment",
        "compensation",
        "done",
    ) in kinds
    placed = view["events"][0]
    children = [e for e in view["events"] if e["causation_id"] == placed["id"]]
    assert sorted(e["type"] for e in children) == ["PaymentDeclined", "StockReserved"]
    assert view["stuck_at"] == []


def test_trace_without_the_app_and_of_an_unknown_id(db_url: str) -> None:
    assert "pass --app" in cli("trace", "o-stuck", "--db", db_url).output
    missing = CliRunner().invoke(main, ["trace", "nope", "--db", db_url])
    assert missing.exit_code == 1 and "no transaction 'nope'" in missing.output


def test_stuck_lists_only_the_stuck_transaction(db_url: str) -> None:
    text = cli("stuck", "--older-than", "0s", "--db", db_url, "--app", APP)
    assert text.exit_code == 1  # there is one: scripts can alert on it
    assert "o-stuck" in text.output and "o-ok" not in text.output and "o-bad" not in text.output

    rows = json.loads(
        cli("stuck", "--older-than", "0s", "--db", db_url, "--app", APP, "--json").output
    )
    assert [r["correlation_id"] for r in rows] == ["o-stuck"]
    assert any("stock.reserve (silent" in w for w in rows[0]["waiting_for"])

    none = cli("stuck", "--older-than", "1h", "--db", db_url)
    assert none.exit_code == 0 and "no transaction older than 1h" in none.output


def test_stats_counts_transactions_and_handlings(db_url: str) -> None:
    text = cli("stats", "--db", db_url, "--stuck-after", "0s").output
    assert "3 transactions: 1 completed, 1 failed, 1 in flight (1 for over 0s)" in text

    stats = json.loads(cli("stats", "--db", db_url, "--json").output)
    assert stats["transactions"]["total"] == 3
    assert stats["transactions"]["compensated"] == 1
    assert stats["transactions"]["with_retries"] == 1
    assert stats["services"]["stock"]["retry"] == 1
    assert stats["services"]["stock"]["compensations"] == 1
    assert stats["events"]["OrderPlaced"] == 3


def test_a_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["stats", "--db", f"sqlite:///{tmp_path}/none.db"])
    assert result.exit_code == 2 and "run `choreograph record` first" in result.output


def test_stuck_tells_found_stuck_from_no_database_by_its_exit_code(
    db_url: str, tmp_path: Path
) -> None:
    # given a recorder database with a stuck transaction, and a path with none
    found = cli("stuck", "--older-than", "0s", "--db", db_url)
    missing = CliRunner().invoke(main, ["stuck", "--db", f"sqlite:///{tmp_path}/none.db"])
    # then the two exit differently, and --help says which is which
    assert (found.exit_code, missing.exit_code) == (1, 2)
    assert not (tmp_path / "none.db").exists()
    help_text = " ".join(cli("stuck", "--help").output.split())
    assert "1 some are" in help_text and "2 no recorder database" in help_text


@pytest.mark.parametrize(
    "text, seconds",
    [("30s", 30), ("5m", 300), ("1.5h", 5400), ("250ms", 0.25), ("2", 2), ("1d", 86400)],
)
def test_durations(text: str, seconds: float) -> None:
    from choreograph.cli.observe import parse_duration

    assert parse_duration(text) == seconds
