"""Options and helpers shared by the CLI commands."""

from __future__ import annotations

import asyncio
import functools
import glob
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from choreograph.app import App, load_app
from choreograph.errors import ChoreographError
from choreograph.store import Store, store_from_url
from choreograph.stores.sqlite import SqliteStore
from choreograph.transport import DEFAULT_TRANSPORT_URL, Transport, redact, transport_from_url
from choreograph.transports.sqlite import SqliteTransport

T = TypeVar("T")


def _console(stderr: bool = False) -> Console:
    """A terminal gets rich output at its width; a pipe or a file gets plain lines that are
    never wrapped or cut (a table is as wide as its widest cell)."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=100_000)


console = _console()
err_console = _console(stderr=True)


class MissingInput(click.ClickException):
    """Nothing to read: a bus or store file, database or service that does not exist. Commands
    that only read state refuse it (exit code 2) rather than create an empty one."""

    exit_code = 2


def existing_bus(url: str) -> Transport:
    """The transport ``url`` names, refusing an embedded bus file that does not exist."""
    transport = transport_from_url(url)
    if isinstance(transport, SqliteTransport) and not Path(transport.settings.path).exists():
        raise MissingInput(
            f"no bus at {redact(url)} (no such file): name the bus the services use with "
            "--transport or CHOREOGRAPH_TRANSPORT"
        )
    return transport


def existing_store(url: str, service: str) -> Store:
    """The store of ``service`` under the template ``url``, refusing a store file that does not
    exist (a misspelt service, or the wrong --store); the message names the services found."""
    store = store_from_url(url, service)
    path = store.path if isinstance(store, SqliteStore) else ":memory:"
    if path != ":memory:" and not Path(path).exists():
        raise MissingInput(
            f"service {service!r} has no store at {path}; "
            + _stores_found(url)
            + " (pass the services' store template with --store or CHOREOGRAPH_STORE)"
        )
    return store


def _stores_found(template: str) -> str:
    if "{service}" not in template:
        return "no store there"
    probe = store_from_url(template, "{service}")  # its path, with {service} left in it
    if not isinstance(probe, SqliteStore):
        return "no store there"
    head, _, tail = probe.path.partition("{service}")
    found = sorted(
        path[len(head) : len(path) - len(tail)]
        for path in glob.glob(glob.escape(head) + "*" + glob.escape(tail))
    )
    return f"services with a store there: {', '.join(found)}" if found else "no store there"


transport_option = click.option(
    "--transport",
    "-t",
    "transport_url",
    envvar="CHOREOGRAPH_TRANSPORT",
    default=DEFAULT_TRANSPORT_URL,
    show_default=True,
    help="Bus URL: sqlite:///file.db, memory://, nats://host:4222, amqp://..., redis://...",
)
app_option = click.option(
    "--app",
    "-a",
    "app_spec",
    envvar="CHOREOGRAPH_APP",
    required=True,
    help="The app, as module:attribute.",
)


def resolve_app(spec: str) -> App:
    """Import the app; modules in the working directory are found as with ``python -m``."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return load_app(spec)
    except ChoreographError as exc:
        raise click.BadParameter(str(exc), param_hint="--app") from None


def run_async(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Run an async command body; turn choreograph errors into clean CLI errors (with any URL
    in them redacted: a driver's message may quote the URL it was given)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return asyncio.run(fn(*args, **kwargs))
        except ChoreographError as exc:
            raise click.ClickException(redact(str(exc))) from None
        except (ConnectionError, OSError) as exc:
            raise click.ClickException(redact(f"cannot reach the bus or store: {exc}")) from None

    return wrapper
