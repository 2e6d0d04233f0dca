"""The SQLite store's URL, its in-memory form, and its refusal to serve a second service."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from choreograph.errors import ConfigurationError
from choreograph.stores.sqlite import SqliteStore


def test_the_file_is_the_url_path_relative_or_absolute() -> None:
    assert SqliteStore.from_url("sqlite:///data/svc.db", "svc").path == "data/svc.db"
    assert SqliteStore.from_url("sqlite:////srv/svc.db", "svc").path == "/srv/svc.db"


def test_a_url_naming_no_file_is_refused() -> None:
    with pytest.raises(ConfigurationError) as refused:
        SqliteStore.from_url("sqlite:///", "svc")
    assert str(refused.value) == "store URL 'sqlite:///' names no file (sqlite:///path.db)"


async def test_an_in_memory_store_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SqliteStore.from_url("memory://", "svc")
    await store.open()
    try:
        async with store.transaction() as tx:
            await tx.put("k", "1", {"v": 1})
    finally:
        await store.close()
    assert not (tmp_path / ":memory:").exists()


async def test_a_file_of_another_service_is_refused_saying_how_to_give_each_its_own(
    tmp_path: Path,
) -> None:
    path = f"{tmp_path}/shared.db"
    first = SqliteStore.from_url(f"sqlite:///{path}", "ping")
    await first.open()
    await first.close()
    second = SqliteStore.from_url(f"sqlite:///{path}", "pong")
    said = (
        f"the store {path} belongs to service 'ping'; 'pong' cannot share it (one inbox for "
        "both: each would skip the other's events as duplicates). Give each service its own "
        "store: put {service} in the store URL, e.g. sqlite:///.choreograph/{service}.db"
    )
    with pytest.raises(ConfigurationError, match=f"^{re.escape(said)}$"):
        await second.open()
