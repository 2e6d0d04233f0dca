"""``choreograph run`` and ``choreograph demo``."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from typing import Any

import click

from choreograph.cli._common import app_option, console, resolve_app, run_async, transport_option
from choreograph.errors import ConfigurationError
from choreograph.middleware import Middleware
from choreograph.runtime.health import HealthServer
from choreograph.runtime.runner import DEFAULT_STORE_URL, Runtime, declare_groups
from choreograph.runtime.worker import WorkerSettings
from choreograph.transport import load_backend, redact, transport_from_url

store_option = click.option(
    "--store",
    "store_url",
    envvar="CHOREOGRAPH_STORE",
    default=DEFAULT_STORE_URL,
    show_default=True,
    help="Service store URL template; {service} stands for the service name.",
)


@click.command()
@app_option
@transport_option
@store_option
@click.option("--service", "-s", "services", multiple=True, help="Run only this service (repeat).")
@click.option("--concurrency", type=click.IntRange(1, 256), default=2, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=200, show_default=True)
@click.option(
    "--lease",
    type=click.FloatRange(0.1),
    default=30.0,
    show_default=True,
    help="Seconds before a message held by a dead process is redelivered.",
)
@click.option(
    "--asgi",
    default=None,
    help="Also serve HTTP: module:factory, factory(runtime) returns an ASGI app.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--health-port",
    type=click.IntRange(1, 65535),
    envvar="CHOREOGRAPH_HEALTH_PORT",
    default=None,
    help="Serve /healthz and /readyz on this port (for an orchestrator's probes).",
)
@click.option(
    "--health-host",
    envvar="CHOREOGRAPH_HEALTH_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address of the health endpoints (0.0.0.0 in a container, for the kubelet).",
)
@click.option(
    "--grace-period",
    type=click.FloatRange(0.1),
    envvar="CHOREOGRAPH_GRACE_PERIOD",
    default=25.0,
    show_default=True,
    help="Seconds from SIGTERM to exit: messages in hand are finished or handed back by then.",
)
@click.option(
    "--middleware",
    "middleware_specs",
    multiple=True,
    help="module:factory returning a Middleware (or a list of them); repeatable.",
)
@run_async
async def run(
    app_spec: str,
    transport_url: str,
    store_url: str,
    services: tuple[str, ...],
    concurrency: int,
    batch_size: int,
    lease: float,
    asgi: str | None,
    port: int,
    host: str,
    health_port: int | None,
    health_host: str,
    grace_period: float,
    middleware_specs: tuple[str, ...],
) -> None:
    """Run services of an app (all by default) until SIGINT or SIGTERM.

    On the signal the process turns not ready (/readyz answers 503), takes no new messages,
    finishes the batches in hand and hands back the rest, then exits; past --grace-period it
    exits anyway with code 1 (what it still held comes back to the group after its lease).

    Tracing, metrics and flow reports are turned on by OTEL_TRACES_EXPORTER,
    CHOREOGRAPH_METRICS_PORT and CHOREOGRAPH_RECORD=1 (before any --middleware)."""
    from choreograph.observe import middleware_from_env

    app = resolve_app(app_spec)
    middleware = middleware_from_env()
    middleware += [mw for spec in middleware_specs for mw in load_middleware(spec)]
    settings = WorkerSettings(concurrency=concurrency, batch_size=batch_size, lease=lease)
    runtime = Runtime(
        app,
        transport=transport_url,
        store=store_url,
        services=services or None,
        settings=settings,
        middleware=middleware,
    )
    health = HealthServer(runtime, health_host, health_port) if health_port else None
    if health is not None:
        await health.start()  # before the runtime: /healthz answers while it connects
        console.print(f"health on http://{health_host}:{health.port}/healthz and /readyz")
    server: Any = None
    await runtime.start()
    try:
        names = ", ".join(runtime.workers)
        console.print(f"running [bold]{names}[/] of {app.name} on [cyan]{redact(transport_url)}[/]")
        if asgi:
            server = _http_server(_load_factory(asgi)(runtime), host, port)
            serving = asyncio.create_task(server.serve())
            console.print(f"serving HTTP on http://{host}:{port}")
        await runtime.run_until_signalled()
    finally:
        if health is not None:
            health.drain()
        if server is not None:
            server.should_exit = True
            await serving
        drained = await _stop_within(runtime, grace_period)
        if health is not None:
            await health.stop()
    if not drained:
        console.print(
            f"not drained within the grace period of {grace_period:g}s: "
            "messages still held come back to their group after their lease"
        )
        raise SystemExit(1)
    console.print("stopped cleanly")


@click.command()
@app_option
@transport_option
@run_async
async def declare(app_spec: str, transport_url: str) -> None:
    """Declare the group of every service of an app on the bus (with its streams, queues or
    consumers), and of its external participants, and nothing else, then exit.

    Run it before any replica exists (a Kubernetes Job, an init step): events published from
    then on are kept for each service even while it runs no replica. Running it again changes
    nothing. Exits 0 once every group exists."""
    app = resolve_app(app_spec)
    transport = transport_from_url(transport_url)
    async with transport:
        await declare_groups(transport, app)
    for service in app.services.values():
        topics = sorted(cls.event_type for cls in app.subscriptions(service))
        if topics:
            console.print(f"declared [bold]{service.name}[/]: {', '.join(topics)}")
    for participant in app.external.values():
        topics = sorted(cls.event_type for cls in participant.consumes)
        if topics:
            console.print(f"declared [bold]{participant.name}[/] (external): {', '.join(topics)}")
    console.print(f"groups of {app.name} declared on [cyan]{redact(transport_url)}[/]")


async def _stop_within(runtime: Runtime, grace_period: float) -> bool:
    """Stop the runtime; False when it did not finish within ``grace_period`` seconds."""
    stopping = asyncio.ensure_future(runtime.stop())
    done, _ = await asyncio.wait({stopping}, timeout=grace_period)
    if not done:
        stopping.cancel()
        return False
    stopping.result()
    return True


def _load_factory(spec: str, option: str = "--asgi") -> Any:
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ConfigurationError(f"{option} expects module:attribute, got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"cannot load {option} {spec!r}: {exc}") from None


def load_middleware(spec: str) -> list[Middleware]:
    """Call the factory ``spec`` names; accept one Middleware or a list of them."""
    made = _load_factory(spec, "--middleware")()
    found = list(made) if isinstance(made, list | tuple) else [made]
    for item in found:
        if not isinstance(item, Middleware):
            raise ConfigurationError(f"--middleware {spec!r} returned {item!r}, not a Middleware")
    return found


def _http_server(asgi_app: Any, host: str, port: int) -> Any:
    try:
        import uvicorn
    except ImportError:
        raise ConfigurationError("--asgi needs uvicorn: pip install 'choreograph[http]'") from None
    config = uvicorn.Config(asgi_app, host=host, port=port, log_level="warning", lifespan="off")
    return uvicorn.Server(config)


@click.command()
@click.option(
    "--deliveries", "-n", type=click.IntRange(1, 1_000_000), default=200, show_default=True
)
@click.option(
    "--transport",
    "-t",
    "transport_url",
    default=None,
    help="Bus URL (default: a fresh embedded SQLite bus in --data-dir).",
)
@click.option(
    "--store",
    "store_url",
    default=None,
    help="Service store URL template, {service} standing for the service's name, e.g. "
    "postgresql://127.0.0.1:5432/test?schema=demo_{service} (default: SQLite files in "
    "--data-dir; a database store keeps its data between runs, --fresh does not empty it).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".choreograph/demo"),
    show_default=True,
)
@click.option(
    "--rejection-rate", type=click.FloatRange(0, 1), default=None, envvar="DRONE_REJECTION_RATE"
)
@click.option(
    "--transient-error-rate",
    type=click.FloatRange(0, 1),
    default=None,
    envvar="DRONE_TRANSIENT_ERROR_RATE",
)
@click.option(
    "--slow-drone-rate", type=click.FloatRange(0, 1), default=None, envvar="DRONE_SLOW_DRONE_RATE"
)
@click.option(
    "--slow-drone-seconds",
    type=click.FloatRange(0),
    default=None,
    envvar="DRONE_SLOW_DRONE_SECONDS",
)
@click.option(
    "--silent-drone-scheduler", is_flag=True, default=None, envvar="DRONE_SILENT_DRONE_SCHEDULER"
)
@click.option("--fleet-size", type=click.IntRange(1), default=None, envvar="DRONE_FLEET_SIZE")
@click.option(
    "--flight-seconds", type=click.FloatRange(0), default=None, envvar="DRONE_FLIGHT_SECONDS"
)
@click.option(
    "--join-timeout", type=click.FloatRange(0.1), default=None, envvar="DRONE_JOIN_TIMEOUT"
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 512),
    default=16,
    show_default=True,
    help="HTTP clients submitting in parallel.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(1),
    default=120.0,
    show_default=True,
    help="Seconds to wait for every delivery to end.",
)
@click.option("--fresh", is_flag=True, help="Wipe --data-dir first (it is kept by default).")
@click.option(
    "--keep",
    is_flag=True,
    help="On a broker, keep the namespace the demo made (deleted at the end by default).",
)
@click.option(
    "--record/--no-record",
    default=True,
    show_default=True,
    help="Record every event and handling into --data-dir/flows.db (for choreograph console).",
)
def demo(
    deliveries: int,
    transport_url: str | None,
    store_url: str | None,
    data_dir: Path,
    concurrency: int,
    timeout: float,
    fresh: bool,
    keep: bool,
    record: bool,
    **knob_values: Any,
) -> None:
    """Run the drone delivery end to end and check that every delivery ended cleanly.

    The data directory keeps the stores, the bus and the recorder database between runs, so that
    `choreograph console` (or `trace`) shows the deliveries afterwards; --fresh starts over.
    On a broker (--transport nats://, amqp://, redis://) the demo makes a namespace of its own and
    deletes it at the end, leaving nothing behind; --keep keeps it.

    Exits 1 when a delivery did not end or a drone or package was left held. Knobs default to the
    DRONE_* environment variables, then to the built-in defaults.
    """
    try:
        # The demo serves HTTP: without the extra, one line naming it instead of a traceback.
        # Any module of choreograph.demo imports the HTTP service, so load every one this way.
        knobs_class = load_backend("choreograph.demo.knobs", "Knobs", "demo", "demo")
        run_demo = load_backend("choreograph.demo.runner", "run_demo", "demo", "demo")
        print_summary = load_backend("choreograph.demo.runner", "print_summary", "demo", "demo")
        knobs = knobs_class.from_env(**knob_values)
        result = asyncio.run(
            run_demo(
                deliveries=deliveries,
                knobs=knobs,
                transport_url=transport_url,
                store_url=store_url,
                data_dir=data_dir,
                concurrency=concurrency,
                timeout=timeout,
                console=console,
                fresh=fresh,
                record=record,
                keep=keep,
            )
        )
    except ConfigurationError as exc:
        raise click.ClickException(redact(str(exc))) from None
    print_summary(result, console)
    if not result.consistent:
        raise SystemExit(1)


COMMANDS = [run, declare, demo]
