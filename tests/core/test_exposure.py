"""What the framework exposes by default: HTTP surfaces on the loopback interface only, and
files that only their owner can read."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from choreograph.cli import main
from choreograph.observe import MetricsMiddleware, middleware_from_env
from choreograph.observe.flowdb import flowdb_from_url
from choreograph.store import store_from_url
from choreograph.transport import transport_from_url

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def file_modes(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its mode, in octal."""
    return {str(p): oct(mode(p)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """A umask that takes nothing away: the modes seen are the framework's own choice."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


async def test_the_metrics_endpoint_listens_on_the_loopback_interface_by_default() -> None:
    metrics = MetricsMiddleware(port=0, lag_interval=60)
    from_env = middleware_from_env({"CHOREOGRAPH_METRICS_PORT": "0"})
    assert [m.addr for m in from_env if isinstance(m, MetricsMiddleware)] == ["127.0.0.1"]
    exposed = middleware_from_env(
        {"CHOREOGRAPH_METRICS_PORT": "0", "CHOREOGRAPH_METRICS_ADDR": "0.0.0.0"}
    )
    assert [m.addr for m in exposed if isinstance(m, MetricsMiddleware)] == ["0.0.0.0"]

    class View:
        workers: dict[str, object] = {}
        transport = None

    await metrics.start(View())  # type: ignore[arg-type]
    try:
        assert metrics._server is not None
        assert metrics._server.server_address[0] == "127.0.0.1"
    finally:
        await metrics.stop()


def test_every_command_that_serves_http_binds_the_loopback_interface_by_default() -> None:
    # given every command of the CLI, and every option of theirs that names an address to bind
    found = {}
    for name, command in main.commands.items():
        for param in command.params:
            option = param.name or ""
            if isinstance(param, click.Option) and option.endswith(("host", "bind", "addr")):
                found[f"{name} --{param.name}"] = param.default
    # then there are at least the HTTP servers of `run` (app and health) and of `console`, and
    # each one defaults to loopback
    assert {"run --host", "run --health_host", "console --host"} <= set(found), found
    assert all(default in LOOPBACK for default in found.values()), found


@pytest.mark.usefixtures("permissive_umask")
async def test_created_files_are_owner_only_in_owner_only_directories(tmp_path: Path) -> None:
    # given a directory that exists, and paths under directories that do not
    bus = tmp_path / "bus.db"
    store_file = tmp_path / "data" / "services" / "package.db"
    flows = tmp_path / "flows.db"
    # when the framework creates a bus, a service store and a recorder database
    transport = transport_from_url(f"sqlite:///{bus}")
    await transport.connect()
    store = store_from_url(f"sqlite:///{store_file}", "package")
    await store.open()
    db = flowdb_from_url(f"sqlite:///{flows}")
    await db.open()
    async with store.transaction() as tx:
        await tx.put("package", "p1", {"secret": "business data"})
    try:
        # then every file it made (SQLite's -wal and -shm included) is 0600, its directories 0700
        made = file_modes(tmp_path)
        assert {str(bus), str(store_file), str(flows)} <= set(made)
        assert any(name.endswith("-wal") for name in made)
        assert made == dict.fromkeys(made, "0o600")
        for directory in (tmp_path / "data", tmp_path / "data" / "services"):
            assert oct(mode(directory)) == "0o700"
    finally:
        await transport.close()
        await store.close()
        await db.close()


@pytest.mark.usefixtures("permissive_umask")
def test_the_demo_data_directory_and_settings_are_owner_only(tmp_path: Path) -> None:
    from choreograph.demo.runner import _prepare_dir, _write_console_settings

    data_dir = tmp_path / "a" / "demo"
    _prepare_dir(data_dir, fresh=False)
    _write_console_settings(data_dir, {"transport": "nats://token@127.0.0.1:4222"})
    assert oct(mode(tmp_path / "a")) == oct(mode(data_dir)) == "0o700"
    (settings,) = data_dir.iterdir()
    assert oct(mode(settings)) == "0o600"


@pytest.mark.usefixtures("permissive_umask")
async def test_existing_files_keep_their_mode(tmp_path: Path) -> None:
    # given a bus file its owner made readable to a group on purpose
    bus = tmp_path / "shared.db"
    bus.touch(mode=0o640)
    # when the framework opens it
    transport = transport_from_url(f"sqlite:///{bus}")
    await transport.connect()
    await transport.close()
    # then its mode is left alone
    assert oct(mode(bus)) == "0o640"
