"""The transport conformance suite: one set of tests, run against every transport.

Every test takes the ``make_transport`` fixture of ``tests/conftest.py``, which is parametrized
over ``memory``, ``sqlite``, ``nats``, ``amqp`` and ``redis`` (broker ones skip locally when their
server is down and fail under ``CI=true``). Run one transport with, e.g.::

    .venv/bin/python -m pytest tests/conformance -k nats -q

Tests marked ``broker_restart`` close and reopen transports or stop and start a broker server.
The one that stops a shared server runs only under ``CI=true`` or with
``CHOREOGRAPH_BROKER_RESTART=1`` (it would break anyone else using the server at that moment);
deselect all of them with ``-m "not broker_restart"``.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "broker_restart: reopens the transport or restarts the broker server to check durability",
    )
