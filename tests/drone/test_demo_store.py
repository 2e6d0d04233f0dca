"""``choreograph demo --store``: the drone delivery with its services' stores in PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from choreograph.cli import main
from choreograph.demo.inspect_state import snapshot
from tests.stores.conftest import PG_URL, drop_schemas
from tests.support.brokers import POSTGRES

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_the_demo_runs_on_postgresql_stores(tmp_path: Path, namespace: str) -> None:
    # given PostgreSQL schemas of the test's own for every service, and the embedded bus
    POSTGRES.require()
    store = f"{PG_URL}?schema={namespace}_{{service}}"
    try:
        # when the demo runs 30 deliveries with its stores there
        result = CliRunner().invoke(
            main,
            ["demo", "-n", "30", "--store", store, "--data-dir", str(tmp_path / "demo"),
             "--no-record", "--timeout", "60"],
        )  # fmt: skip
        # then it ends every delivery, and the deliveries are in PostgreSQL (not in the data dir)
        assert result.exit_code == 0, result.output
        assert "every delivery ended" in result.output, result.output
        snap = asyncio.run(snapshot(store))
        assert snap.terminal == 30, snap
        assert snap.drones_reserved == 0, snap
        assert not list((tmp_path / "demo").glob("package.db*"))
    finally:
        asyncio.run(drop_schemas(namespace))
