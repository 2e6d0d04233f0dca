"""The ``choreograph`` command line."""

from __future__ import annotations

import logging

import click

from choreograph import __version__
from choreograph.transport import redact


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="choreograph")
@click.option("--log-level", default="WARNING", show_default=True, help="Python logging level.")
def main(log_level: str) -> None:
    """Run and inspect choreographed services."""
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise click.BadParameter(f"unknown level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_Redacting(handler.formatter))


class _Redacting(logging.Formatter):
    """Formats as ``inner`` does, then redacts the URLs in the line (tracebacks included): a
    library may log the URL it was given, password and all."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record))


def _register() -> None:
    from choreograph.cli import bus, console, observe, run

    for module in (run, bus, observe, console):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
