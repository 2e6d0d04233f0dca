"""The service's own tables on each store whose database outlives its store object (a test
restarts services): SQLite files and PostgreSQL schemas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.stores.conftest import STORE_URLS, drop_schemas
from tests.support.brokers import POSTGRES


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store_url(
    request: pytest.FixtureRequest, namespace: str, tmp_path: Path
) -> AsyncIterator[str]:
    if request.param == "postgres":
        POSTGRES.require()
    yield STORE_URLS[request.param].format(ns=namespace, tmp=tmp_path)
    if request.param == "postgres":
        await drop_schemas(namespace)
