"""The pytest plugin is registered by the package and its harness fixture stops what it started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

INNER = """
from examples.hello import Ping, Pong, app

started = []


async def test_the_fixture_gives_a_started_harness(harness):
    h = await harness(app)
    started.append(h)
    await h.publish(Ping(text="hi"), correlation_id="t1")
    assert (await h.wait_for(Pong, correlation_id="t1")).data == {"text": "HI"}


async def test_the_harness_was_stopped_after_the_test():
    assert started and started[0].runtime.workers == {}
"""


def test_the_harness_fixture_works_in_a_project_with_no_conftest(tmp_path: Path) -> None:
    # given a test file outside this repository's tests, with no conftest declaring anything
    (tmp_path / "test_inner.py").write_text(INNER)
    root = Path(__file__).resolve().parents[2]
    # when pytest runs it (the plugin comes from the installed package's pytest11 entry point)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
         "asyncio_mode=auto", "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=100,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    # then both tests pass: the fixture exists, and stopped its harness at teardown
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout
