"""The Node.js projects some tests run: the official AsyncAPI parser (``tools/asyncapi-validate``)
and the Node.js participant (``tests/contracts/node``). Their npm packages are installed from
their lock files by ``scripts/node-tools.sh`` (which ``make test`` and
``scripts/install-tools.sh`` call), never by a test: a test finding them missing fails, saying
what to run, locally and under ``CI=true`` alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ASYNCAPI_VALIDATOR = ROOT / "tools" / "asyncapi-validate"
NODE_PARTICIPANT = ROOT / "tests" / "contracts" / "node"


def node_project(project: Path, package: str) -> str:
    """The path of ``node`` once ``project`` has ``package`` installed; fails the test if not."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("this test needs Node.js 18+ on PATH: run bash scripts/install-tools.sh")
    if not (project / "node_modules" / package / "package.json").is_file():
        pytest.fail(
            f"{project.relative_to(ROOT)} has no node_modules/{package}: "
            "run bash scripts/node-tools.sh (npm ci from the lock file; make test runs it)"
        )
    return node
