"""``choreograph console`` refuses what it cannot serve safely or at all, with one clear line."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from choreograph.cli import main
from choreograph.observe.flowdb import flowdb_from_url


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/flows.db"

    async def create() -> None:
        db = flowdb_from_url(url)
        await db.open()
        await db.close()

    asyncio.run(create())
    return url


def _console(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["console", *args], env={"CHOREOGRAPH_CONSOLE_TOKEN": ""})
    return result.exit_code, result.output


def test_listening_beyond_loopback_needs_a_token(db_url: str) -> None:
    code, output = _console("--db", db_url, "--host", "0.0.0.0", "--port", "0")
    assert code == 1
    assert "refusing to serve the console on 0.0.0.0" in output and "--token" in output
    code, output = _console("--db", db_url, "--host", "0.0.0.0", "--token", "short")
    assert code == 1 and "at least 12 characters" in output


def test_missing_or_unreachable_sources_are_one_line_errors(db_url: str, tmp_path: Path) -> None:
    code, output = _console("--db", f"sqlite:///{tmp_path}/none.db", "--demo-dir", str(tmp_path))
    assert code == 1 and "no recorder database" in output and "choreograph demo" in output
    code, output = _console("--db", db_url, "--app", "no_such_module:app")
    assert code == 1 and "cannot import app module 'no_such_module'" in output
    code, output = _console("--db", "postgresql://u:hunter2@127.0.0.1:1/x")
    assert code == 1 and "cannot open" in output and "hunter2" not in output
    assert "Traceback" not in output
