"""The CLI meets bad input with a clear error and a non-zero exit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner

from choreograph.cli import main
from choreograph.store import Store, store_from_url

HELLO = "examples.hello:app"


@pytest.fixture
def bus(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/bus.db"


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["run", "--app", "no.such.module:app"], "cannot import app module"),
        (["run", "--app", "examples.hello:nothing"], "is not a choreograph App"),
        (["run", "--app", HELLO, "--service", "nope"], "has no service 'nope'"),
        (["run", "--app", HELLO, "--transport", "kafka://x"], "unknown transport"),
        (["run", "--app", HELLO, "--transport", "sqlite:///x.db?bogus=1"], "unknown option"),
        (["run", "--app", HELLO, "--concurrency", "0"], "0 is not in the range"),
        (["publish", "Nope", "{}", "--app", HELLO], "not an event of hello; known: Ping, Pong"),
        (["publish", "Ping", "{oops", "--app", HELLO], "not valid JSON"),
        (["publish", "Ping", "[1]", "--app", HELLO], "must be a JSON object"),
        (["publish", "Ping", '{"text": 5}', "--app", HELLO], "Ping: text"),
        (["dlq", "replay"], "name dead letter ids, or use --all"),
        (["demo", "--rejection-rate", "2"], "2.0 is not in the range"),
        (["--log-level", "LOUD", "dlq", "list"], "unknown level"),
    ],
)
def test_bad_arguments_get_a_clear_error(args: list[str], says: str, bus: str) -> None:
    code, output = invoke(*args)
    assert code != 0
    assert says in output


def test_publish_then_dead_letters_can_be_listed_shown_and_discarded(bus: str) -> None:
    code, output = invoke("publish", "Ping", '{"text": "hi"}', "--app", HELLO, "-t", bus)
    assert code == 0, output
    assert "published Ping" in output
    code, output = invoke("dlq", "list", "-t", bus)
    assert (code, output.strip()) == (0, "no dead letters")
    code, output = invoke("dlq", "show", "42", "-t", bus)
    assert code != 0
    assert "no dead letter '42'" in output
    code, output = invoke("dlq", "discard", "42", "-t", bus)
    assert code == 1


def test_timers_commands_report_an_empty_service(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/{{service}}.db"
    asyncio.run(_open_and_close(store_from_url(store, "delivery")))  # the service ran once
    code, output = invoke("timers", "list", "--service", "delivery", "--store", store)
    assert (code, output.strip()) == (0, "no pending timers in delivery")
    code, output = invoke("timers", "cancel", "deadline:x", "k", "-s", "delivery", "--store", store)
    assert code != 0
    assert "has no pending timer deadline:x for k" in output


async def _open_and_close(store: Store) -> None:
    await store.open()
    await store.close()
