"""Hypothesis profiles of the fuzz suite.

``default`` (what ``make test`` runs) tries a few examples per transport and store; ``long``
tries many more. Choose with the ``HYPOTHESIS_PROFILE`` environment variable::

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/fuzz --timeout 0
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,  # one example waits for real brokers: no per-example time limit
    "database": None,  # nothing written to the work tree; a failure prints its reproduction blob
    "print_blob": True,
    # the running services are shared by the examples of one test, on purpose
    "suppress_health_check": [
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
}
settings.register_profile("default", max_examples=20, **_COMMON)
settings.register_profile("long", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
