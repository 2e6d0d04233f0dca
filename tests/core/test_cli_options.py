"""Options of the CLI that the other CLI tests do not reach: ``--version``, ``timers list --key
--json``, ``asyncapi --server --version``, and ``load_app``, which resolves every ``--app``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import choreograph
from choreograph import App, ConfigurationError, load_app
from choreograph.cli import main
from choreograph.store import Timer, store_from_url

HELLO = "examples.hello:app"


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_version_prints_the_package_version() -> None:
    result = cli("--version")

    assert result.exit_code == 0
    assert result.output.strip() == f"choreograph, version {choreograph.__version__}"


# timers ------------------------------------------------------------------------------------------


@pytest.fixture
def timers_store(tmp_path: Path) -> str:
    """A service store template where service ``delivery`` has three pending timers."""
    template = f"sqlite:///{tmp_path}/{{service}}.db"

    async def seed() -> None:
        store = store_from_url(template, "delivery")
        await store.open()
        try:
            async with store.transaction() as tx:
                await tx.set_timer(Timer("deadline:late", "d1", 2_000_000_000.0, {}))
                await tx.set_timer(Timer("join:both", "d1", 1_900_000_000.0, {}))
                await tx.set_timer(Timer("deadline:late", "d2", 1_950_000_000.0, {}))
        finally:
            await store.close()

    asyncio.run(seed())
    return template


def test_timers_list_of_one_key_as_json_soonest_first(timers_store: str) -> None:
    result = cli(
        "timers", "list", "-s", "delivery", "--store", timers_store, "--key", "d1", "--json"
    )

    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert rows == [
        {"name": "join:both", "key": "d1", "due_at": 1_900_000_000.0},
        {"name": "deadline:late", "key": "d1", "due_at": 2_000_000_000.0},
    ]


def test_timers_list_as_a_table_then_cancel_one(timers_store: str) -> None:
    # given three pending timers, listed as a table
    table = CliRunner(env={"COLUMNS": "200"}).invoke(
        main, ["timers", "list", "-s", "delivery", "--store", timers_store]
    )
    assert table.exit_code == 0, table.output
    assert table.output.count("deadline:late") == 2 and "join:both" in table.output

    # when one is cancelled
    cancelled = cli("timers", "cancel", "deadline:late", "d2", "-s", "delivery",
                    "--store", timers_store)  # fmt: skip

    # then it is gone and the others remain
    assert cancelled.exit_code == 0, cancelled.output
    assert "cancelled deadline:late for d2" in cancelled.output
    left = cli("timers", "list", "-s", "delivery", "--store", timers_store, "--json")
    assert [(r["name"], r["key"]) for r in map(json.loads, left.output.splitlines())] == [
        ("join:both", "d1"),
        ("deadline:late", "d1"),
    ]


# asyncapi ----------------------------------------------------------------------------------------


def test_asyncapi_with_a_version_and_a_server_never_shows_credentials() -> None:
    result = cli("asyncapi", HELLO, "--version", "2.3.4",
                 "--server", "amqp://guest:s3cret@127.0.0.1:5672/prod?namespace=shop")  # fmt: skip

    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["info"]["version"] == "2.3.4"
    assert doc["servers"] == {
        "bus": {
            "host": "127.0.0.1:5672",
            "pathname": "/prod",
            "protocol": "amqp",
            "protocolVersion": "0.9.1",
            "x-choreograph-namespace": "shop",
        }
    }
    assert "s3cret" not in result.output and "guest" not in result.output


# load_app ----------------------------------------------------------------------------------------


def test_load_app_by_module_and_attribute_or_module_alone() -> None:
    from examples import hello

    assert load_app(HELLO) is hello.app
    assert load_app("examples.hello") is hello.app


def test_load_app_calls_a_factory() -> None:
    app = load_app("choreograph.demo:create_app")

    assert isinstance(app, App)
    assert "delivery" in app.services


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("no.such.module:app", "cannot import app module 'no.such.module'"),
        ("examples.hello:nothing", "is not a choreograph App"),
        ("examples.hello:Ping", "is not a choreograph App"),
        ("json", "is not a choreograph App"),
        ("tests.core.test_cli_options:needs_an_argument", "cannot call the app factory"),
    ],
)
def test_load_app_refuses_what_is_not_an_app(spec: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        load_app(spec)


def needs_an_argument(name: str) -> App:
    """An app factory that cannot be called as ``--app`` calls it."""
    return App(name, [])
