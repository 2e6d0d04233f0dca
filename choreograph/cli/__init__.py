"""The ``choreograph`` command line. Exit codes are listed in ``choreograph --help``."""

from __future__ import annotations

import logging

import click

from choreograph import __version__
from choreograph.logs import configure_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="choreograph")
@click.option(
    "--log-level",
    envvar="CHOREOGRAPH_LOG_LEVEL",
    default="WARNING",
    show_default=True,
    help="DEBUG, INFO, WARNING or ERROR. A handler's failure is logged at WARNING, a give-up "
    "(dead letter) at ERROR.",
)
@click.option(
    "--log-format",
    envvar="CHOREOGRAPH_LOG_FORMAT",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per line, with correlation_id and event_id.",
)
def main(log_level: str, log_format: str) -> None:
    """Run and inspect choreographed services.

    \b
    Exit codes:
      0  done
      1  the command ran and found a problem, or not what was named (stuck transactions, lint
         errors, a dead letter or timer that does not exist); each command's --help says which
      2  bad usage, or nothing to read: no such bus or store file, service or recorder database
    """
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        raise click.BadParameter(f"unknown level {log_level!r}", param_hint="--log-level")
    configure_logging(level, "json" if log_format == "json" else "text")


def _register() -> None:
    from choreograph.cli import bus, console, observe, run

    for module in (run, bus, observe, console):
        for command in module.COMMANDS:
            main.add_command(command)
    _show_envvars(main)


def _show_envvars(command: click.Command) -> None:
    """Every option read from the environment says which variable in ``--help``."""
    for param in command.params:
        if isinstance(param, click.Option) and param.envvar:
            param.show_envvar = True
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _show_envvars(sub)


_register()
