"""Options and helpers shared by the CLI commands."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click
from rich.console import Console

from choreograph.app import App, load_app
from choreograph.errors import ChoreographError
from choreograph.transport import DEFAULT_TRANSPORT_URL, redact

T = TypeVar("T")
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

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
