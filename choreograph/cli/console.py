"""``choreograph console``: serve the web console."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import click

from choreograph.cli._common import console as out
from choreograph.errors import ChoreographError, ConfigurationError
from choreograph.observe.flowdb import DEFAULT_DB_URL, SqliteFlowDb, flowdb_from_url
from choreograph.transport import load_backend, redact


@click.command(name="console")
@click.option(
    "--db",
    "db_url",
    envvar="CHOREOGRAPH_RECORDER_DB",
    default=None,
    help="Recorder database (env CHOREOGRAPH_RECORDER_DB). Default: the last demo's, "
    f"else {DEFAULT_DB_URL}.",
)
@click.option(
    "--app",
    "-a",
    "app_spec",
    envvar="CHOREOGRAPH_APP",
    default=None,
    help="The app (module:attribute), for the choreography graph.",
)
@click.option(
    "--transport",
    "-t",
    "transport_url",
    envvar="CHOREOGRAPH_TRANSPORT",
    default=None,
    help="The bus, for dead letters, replays and lag.",
)
@click.option(
    "--store",
    "store_url",
    envvar="CHOREOGRAPH_STORE",
    default=None,
    help="The services' store URL template ({service}), for their pending timers.",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; anything but loopback needs --token.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8800, show_default=True)
@click.option(
    "--token",
    envvar="CHOREOGRAPH_CONSOLE_TOKEN",
    default=None,
    help="Visitors sign in with it (env CHOREOGRAPH_CONSOLE_TOKEN, preferred).",
)
@click.option("--read-only", is_flag=True, help="Hide and refuse replay and discard.")
@click.option(
    "--stuck-after",
    default="60s",
    show_default=True,
    help="Silence after which an open transaction counts as stuck.",
)
@click.option(
    "--demo-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".choreograph/demo"),
    show_default=True,
    help="Where the demo's settings are read from when no option names a source.",
)
def console_command(
    db_url: str | None,
    app_spec: str | None,
    transport_url: str | None,
    store_url: str | None,
    host: str,
    port: int,
    token: str | None,
    read_only: bool,
    stuck_after: str,
    demo_dir: Path,
) -> None:
    """Serve the web console: every transaction live, dead letters, the choreography.

    With no options it shows the last `choreograph demo` run (its recorder database, app, bus and
    stores). Binds 127.0.0.1; any other address needs a token.
    """
    from choreograph.cli.observe import parse_duration

    try:
        # The console serves HTTP: without the extra, one line naming it instead of a traceback
        # (anything of choreograph.console imports its app, and so Starlette: imported after).
        create_console_app = load_backend(
            "choreograph.console.app", "create_console_app", "http", "console"
        )
        uvicorn_config = load_backend("uvicorn", "Config", "http", "console")
        uvicorn_server = load_backend("uvicorn", "Server", "http", "console")
        from choreograph.console.settings import ConsoleSettings, demo_defaults, secret_from_env

        demo: dict[str, str] = {}
        if not any((db_url, app_spec, transport_url, store_url)):
            demo = demo_defaults(demo_dir / "console.json")
        settings = ConsoleSettings(
            db_url=db_url or demo.get("db") or DEFAULT_DB_URL,
            app_spec=app_spec or demo.get("app"),
            transport_url=transport_url or demo.get("transport"),
            store_url=store_url or demo.get("store"),
            host=host, port=port, token=token or None, read_only=read_only,
            stuck_after=parse_duration(stuck_after),
            secret=secret_from_env() or secrets.token_bytes(32),
        )  # fmt: skip
        db = flowdb_from_url(settings.db_url)
        if isinstance(db, SqliteFlowDb) and not Path(db.path).exists():
            raise ConfigurationError(
                f"no recorder database at {settings.db_url}: run `choreograph demo` (it records), "
                "or `choreograph record` beside your services, or pass --db"
            )
        asyncio.run(_reachable(settings.db_url))
        asgi = create_console_app(settings)
    except ChoreographError as exc:
        raise click.ClickException(str(exc)) from None
    shown = f"[{host}]" if ":" in host else host
    out.print(f"console on [bold]http://{shown}:{port}[/] · recorder {redact(settings.db_url)}")
    if settings.transport_url:
        out.print(f"dead letters from {redact(settings.transport_url)}")
    if read_only:
        out.print("read-only: replay and discard are off")
    uvicorn_server(uvicorn_config(asgi, host=host, port=port, log_level="warning")).run()


async def _reachable(db_url: str) -> None:
    """Open and close the recorder database: an unreachable one is a clean error, not a
    traceback from the web server's start-up."""
    db = flowdb_from_url(db_url)
    await db.open()
    await db.close()


COMMANDS = [console_command]
