"""The CLI sets no silent traps: commands that read state refuse what does not exist (and create
nothing), exit codes tell outcomes apart, piped output is never cut, `dlq show` prints one whole
letter with its traceback, `dlq replay --data` validates, every option names its variable."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from choreograph.cli import main
from choreograph.store import store_from_url
from choreograph.transport import Failure, transport_from_url
from choreograph.transports.sqlite import SqliteTransport
from tests.conformance._helpers import message, receive_n
from tests.support.procs import REPO, choreograph_command, free_port

HELLO = "examples.hello:app"
LONG_GROUP = "a-service-with-a-rather-long-name-that-a-narrow-table-would-cut"
LONG_ERROR = "the payment provider answered 503 Service Unavailable, " * 3


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def dead_letter_on(bus: str, group: str, body: bytes, topic: str = "Ping") -> str:
    """One dead letter of ``group`` on the bus, with a traceback; returns its id."""

    async def make() -> str:
        async with transport_from_url(bus) as transport:
            sub = await transport.subscribe(group, [topic])
            await transport.publish([message(topic, body)])
            [delivery] = await receive_n(sub, 1, within=10)
            failure = Failure("attempts exhausted", "RuntimeError", LONG_ERROR, "Traceback: here")
            await sub.dead_letter(delivery, failure)
            [dead] = await transport.dead_letters(group)
            return dead.id

    return asyncio.run(make())


# state that does not exist ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["dlq", "list"],
        ["dlq", "show", "1"],
        ["dlq", "replay", "1"],
        ["dlq", "discard", "1"],
    ],
    ids=["list", "show", "replay", "discard"],
)
def test_dead_letter_commands_refuse_a_bus_file_that_does_not_exist(
    tmp_path: Path, args: list[str]
) -> None:
    # given a bus URL with a typo
    typo = tmp_path / "typo.db"
    # when a command that reads the dead letters is pointed at it
    code, output = invoke(*args, "-t", f"sqlite:///{typo}")
    # then it says there is no such bus, exits 2, and creates nothing
    assert code == 2, output
    assert "no bus at" in output and "typo.db" in output
    assert not typo.exists()


def test_timers_refuse_an_unknown_service_and_name_the_known_ones(tmp_path: Path) -> None:
    # given the stores of two services
    template = f"sqlite:///{tmp_path}/{{service}}.db"

    async def open_stores() -> None:
        for service in ("package", "delivery"):
            store = store_from_url(template, service)
            await store.open()
            await store.close()

    asyncio.run(open_stores())
    for args in (["timers", "list"], ["timers", "cancel", "deadline:x", "k"]):
        # when a timers command names a service that has no store
        code, output = invoke(*args, "--service", "packge", "--store", template)
        # then it is refused with exit 2, naming the services found, and no file is created
        assert code == 2, output
        assert "'packge' has no store" in output
        assert "delivery, package" in output
        assert not (tmp_path / "packge.db").exists()
    # and a known service is read as before
    code, output = invoke("timers", "list", "--service", "package", "--store", template)
    assert (code, output.strip()) == (0, "no pending timers in package")


# dead letters: one letter, validated replays ----------------------------------------------------


def test_dlq_show_prints_one_whole_letter_with_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a dead letter on an embedded bus
    bus = f"sqlite:///{tmp_path}/bus.db"
    dead_id = dead_letter_on(bus, "pong", b'{"not": "an envelope"}')

    # (listing every dead letter to find one held them all in memory: 344 MB for 19k letters)
    async def listed(*args: object, **kwargs: object) -> None:
        raise AssertionError("dlq show listed the dead letters to find one")

    monkeypatch.setattr(SqliteTransport, "dead_letters", listed)
    # when it is shown
    code, output = invoke("dlq", "show", dead_id, "-t", bus)
    # then it is printed whole, the error and traceback included
    assert code == 0, output
    shown = json.loads(output)
    assert (shown["id"], shown["group"], shown["error"]) == (dead_id, "pong", LONG_ERROR)
    assert shown["traceback"] == "Traceback: here"
    # and an id that names no letter exits 1
    assert invoke("dlq", "show", "999", "-t", bus)[0] == 1


def test_dlq_replay_data_is_validated_against_the_event_class(tmp_path: Path) -> None:
    # given a dead-lettered Ping of the hello app
    bus = f"sqlite:///{tmp_path}/bus.db"
    code, output = invoke("publish", "Ping", '{"text": "hi"}', "--app", HELLO, "-t", bus)
    assert code == 0, output

    async def bury() -> str:
        async with transport_from_url(bus) as transport:
            sub = await transport.subscribe("pong", ["Ping"])
            [delivery] = await receive_n(sub, 1, within=10)
            await sub.dead_letter(delivery, Failure("handler error", "E", "e"))
            [dead] = await transport.dead_letters("pong")
            return dead.id

    dead_id = asyncio.run(bury())

    # when it is replayed with data that does not fit Ping, or without the app to check it
    wrong = invoke("dlq", "replay", dead_id, "--data", '{"text": 5}', "--app", HELLO, "-t", bus)
    no_app = invoke("dlq", "replay", dead_id, "--data", '{"text": "x"}', "-t", bus)

    # then both are refused and the letter stays
    assert wrong[0] == 2 and "Ping: text" in wrong[1], wrong
    assert no_app[0] == 2 and "--data needs --app" in no_app[1], no_app
    assert invoke("dlq", "show", dead_id, "-t", bus)[0] == 0

    # and fitting data is replayed
    good = invoke("dlq", "replay", dead_id, "--data", '{"text": "yo"}', "--app", HELLO, "-t", bus)
    assert good[0] == 0 and "replayed 1 of 1" in good[1], good


# output and help --------------------------------------------------------------------------------


def test_piped_output_is_never_cut_at_80_columns(tmp_path: Path) -> None:
    # given a dead letter of a service with a long name, and a long error
    bus = f"sqlite:///{tmp_path}/bus.db"
    dead_letter_on(bus, LONG_GROUP, b"{}")
    # when `dlq list` writes into a pipe
    listed = subprocess.run(
        [*choreograph_command(), "dlq", "list", "-t", bus],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    # then the group name and the (table's 80-character cut of the) error appear whole on
    # one line, not wrapped or cut with an ellipsis
    row = next(line for line in listed.stdout.splitlines() if "RuntimeError" in line)
    assert LONG_GROUP in row
    assert f"RuntimeError: {LONG_ERROR}"[:80] in row
    assert "…" not in listed.stdout


def _options(command: click.Command, path: str = "") -> list[tuple[str, click.Option]]:
    found = [(path, p) for p in command.params if isinstance(p, click.Option)]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found += _options(sub, f"{path} {name}".strip())
    return found


def test_every_option_read_from_the_environment_names_its_variable_in_help() -> None:
    options = _options(main)
    with_env = {(path, o.name) for path, o in options if o.envvar}
    # the settings a deployment sets once are read from the environment
    for wanted in [
        ("", "log_level"),
        ("", "log_format"),
        ("run", "transport_url"),
        ("run", "store_url"),
        ("run", "app_spec"),
        ("publish", "transport_url"),
        ("dlq list", "transport_url"),
        ("timers list", "store_url"),
        ("stuck", "db_url"),
        ("demo", "rejection_rate"),
    ]:
        assert wanted in with_env, wanted
    # and each one says so in its command's --help
    for path, option in options:
        if option.envvar:
            text = CliRunner().invoke(main, [*path.split(), "--help"], terminal_width=200).output
            assert f"env var: {option.envvar}" in " ".join(text.split()), (path, option.name)


def test_an_unreachable_broker_is_one_clean_line_without_driver_noise(tmp_path: Path) -> None:
    # given a RabbitMQ URL where nothing listens
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    # when a command needs it
    done = subprocess.run(
        [*choreograph_command(), "dlq", "list", "-t", url],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    # then stderr holds one line: our error, which names the broker without the password
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("Error: RabbitMQ") and "guest:***@" in done.stderr


def test_the_cli_runs_as_a_module_too() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "choreograph", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0 and "Exit codes" in done.stdout


@pytest.mark.parametrize(
    ("args", "missing", "extra"),
    [
        (["demo", "-n", "1"], "sqlalchemy", "demo"),
        (["demo", "-n", "1"], "starlette", "demo"),
        (["console"], "starlette", "http"),
        (["console"], "uvicorn", "http"),
    ],
    ids=["demo-sqlalchemy", "demo-starlette", "console-starlette", "console-uvicorn"],
)
def test_a_command_whose_extra_is_missing_names_it_in_one_line(
    tmp_path: Path, args: list[str], missing: str, extra: str
) -> None:
    # given an installation without the package the command's extra brings (blocked from import)
    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        "from choreograph.cli import main\n"
        f"main({args!r}, prog_name='choreograph')\n"
    )
    # when the command runs
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    # then it fails with one line naming the extra to install, and no traceback
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"pip install 'choreograph[{extra}]'" in done.stderr
