"""Programs some tests need beside the Python packages (Graphviz's ``dot``, ``rabbitmqctl``).

Like a broker, a missing program skips its test locally with the reason and the way to install
it, and fails the test under ``CI=true``: ``.ci/run`` installs them (scripts/install-tools.sh).
"""

from __future__ import annotations

import shutil

import pytest

from tests.support.brokers import IN_CI

INSTALL = {
    "dot": "apt-get install -y graphviz",
    "rabbitmqctl": "apt-get install -y rabbitmq-server",
}


def require_command(name: str) -> str:
    """The path of program ``name``; skip (locally) or fail (under CI) the test when missing."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name!r} is not installed (install it: {INSTALL.get(name, name)})"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)
