"""The main job: run the whole drone delivery on one machine and check that it ends well.

Every service runs on the bus (the embedded SQLite bus unless told otherwise), the HTTP ingestion
API is served by uvicorn, N deliveries are submitted through it, and the demo waits until every
delivery has ended, then prints a summary and checks the invariants: every delivery terminal,
every drone free, every package of a failed delivery released.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import orjson
import uvicorn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from choreograph import App, Runtime
from choreograph._files import private_dir, private_file
from choreograph.demo.app import create_app
from choreograph.demo.ingestion import create_http_app
from choreograph.demo.inspect_state import Snapshot, snapshot
from choreograph.demo.knobs import Knobs
from choreograph.middleware import Middleware
from choreograph.observe.recorder import RECORDER_GROUP, Recorder, RecorderMiddleware
from choreograph.runtime.runner import declare_groups
from choreograph.transport import redact, transport_from_url

#: The file in the demo's data directory that tells ``choreograph console`` what to show.
CONSOLE_SETTINGS = "console.json"
DEMO_APP = "choreograph.demo:create_app"


@dataclass
class DemoResult:
    submitted: int
    snapshot: Snapshot
    """This run's deliveries (earlier runs kept in the data directory are subtracted)."""
    elapsed: float
    dead_letters: int
    recorder_db: str | None = None
    transport_url: str = ""
    """The bus the demo ran on, with the namespace it made for itself on a broker."""
    deleted_namespace: str | None = None
    """The broker namespace deleted at the end (None: kept, or not on a broker)."""

    @property
    def consistent(self) -> bool:
        s = self.snapshot
        return (
            s.terminal == self.submitted and s.drones_reserved == 0 and s.packages_unreleased == 0
        )


def sample_request(number: int, *, heavy: bool = False) -> dict[str, object]:
    return {
        "delivery_id": f"d-{number:06d}-{uuid.uuid4().hex[:6]}",
        "owner_id": f"owner-{number % 17}",
        "pickup": {"latitude": 47.6 + number % 10 / 100, "longitude": -122.3},
        "dropoff": {"latitude": 47.7, "longitude": -122.2 - number % 10 / 100},
        "package": {
            "package_id": f"p-{number:06d}-{uuid.uuid4().hex[:6]}",
            "size": ("small", "medium", "large")[number % 3],
            "weight_kg": 40.0 if heavy else 1.0 + number % 20,
        },
        "expedited": number % 5 == 0,
    }


def isolated(transport_url: str) -> str:
    """A broker URL with a namespace of its own, so that a demo never sees an earlier run's
    events (the stores start fresh, the broker does not)."""
    if transport_url.startswith(("sqlite:", "memory:")) or "namespace=" in transport_url:
        return transport_url
    separator = "&" if "?" in transport_url else "?"
    return f"{transport_url}{separator}namespace=demo-{uuid.uuid4().hex[:8]}"


def _prepare_dir(path: Path, *, fresh: bool) -> None:
    if fresh:
        shutil.rmtree(path, ignore_errors=True)
    private_dir(path)


def _write_console_settings(data_dir: Path, settings: dict[str, str]) -> None:
    """Where ``choreograph console`` finds this demo's app, bus, stores and recorder database
    when started with no options (the file may hold a broker password: owner-only)."""
    path = private_file(data_dir / CONSOLE_SETTINGS)
    path.write_bytes(orjson.dumps(settings, option=orjson.OPT_INDENT_2))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def serve_http(runtime: Runtime, port: int) -> AsyncIterator[str]:
    config = uvicorn.Config(
        create_http_app(runtime), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def submit_all(base_url: str, count: int, concurrency: int, progress: Progress) -> int:
    task = progress.add_task("submitted", total=count)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for number in range(count):
        queue.put_nowait(number)
    accepted = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal accepted
        while not queue.empty():
            number = queue.get_nowait()
            response = await post_request(client, sample_request(number))
            if response.status_code != 202:
                raise RuntimeError(f"submission refused: {response.status_code} {response.text}")
            accepted += 1
            progress.advance(task)

    # idle connections are dropped by the client before the server's keep-alive timeout ends
    # them (uvicorn: 5 s), so a request never goes out on a connection the server is closing
    limits = httpx.Limits(keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return accepted


async def post_request(
    client: httpx.AsyncClient, body: dict[str, object], attempts: int = 3
) -> httpx.Response:
    """POST one delivery request, sent again when the connection fails under it: ingestion
    accepts a delivery id once, so a request that did arrive is not accepted twice."""
    for attempt in range(1, attempts + 1):
        try:
            return await client.post("/api/deliveryrequests", json=body)
        except httpx.TransportError:
            if attempt == attempts:
                raise
            await asyncio.sleep(0.1 * attempt)
    raise AssertionError("unreachable")


async def wait_for_outcome(
    store_url: str,
    count: int,
    timeout: float,
    progress: Progress,
    baseline: Snapshot | None = None,
) -> Snapshot:
    """Wait until ``count`` more deliveries than ``baseline`` ended and nothing is held."""
    before = baseline.terminal if baseline is not None else 0
    task = progress.add_task("ended", total=count)
    deadline = time.monotonic() + timeout
    snap = await snapshot(store_url)
    while time.monotonic() < deadline:
        progress.update(task, completed=snap.terminal - before)
        settled = snap.terminal - before >= count and snap.drones_reserved == 0
        if settled and snap.packages_unreleased == 0:
            break
        await asyncio.sleep(0.2)
        snap = await snapshot(store_url)
    progress.update(task, completed=snap.terminal - before)
    return snap


async def run_demo(
    *,
    deliveries: int = 200,
    knobs: Knobs | None = None,
    transport_url: str | None = None,
    store_url: str | None = None,
    data_dir: Path = Path(".choreograph/demo"),
    concurrency: int = 16,
    timeout: float = 120.0,
    middleware: list[Middleware] | None = None,
    console: Console | None = None,
    fresh: bool = False,
    record: bool = True,
    keep: bool = False,
) -> DemoResult:
    """Run the demo. The data directory is kept between runs (``fresh`` wipes it first); with
    ``record`` (the default) every event and handling is recorded into ``flows.db`` there, for
    ``choreograph trace`` and ``choreograph console``. On a broker the demo runs in a namespace
    of its own, deleted at the end (streams, queues, exchanges, keys) unless ``keep``; a
    namespace named in ``transport_url`` is the user's, and is never deleted."""
    console = console or Console()
    knobs = knobs or Knobs.from_env()
    await asyncio.to_thread(_prepare_dir, data_dir, fresh=fresh)
    where = await asyncio.to_thread(data_dir.resolve)
    store_url = store_url or f"sqlite:///{where}/{{service}}.db"
    given = transport_url or f"sqlite:///{where}/bus.db"
    transport_url = isolated(given)
    own_namespace = transport_url != given
    db_url = f"sqlite:///{where}/flows.db" if record else None
    app = create_app(knobs)
    console.print(
        f"[bold]drone delivery[/]: {deliveries} deliveries on [cyan]{redact(transport_url)}[/], "
        f"services {', '.join(app.services)}"
    )
    extra: list[Middleware] = [RecorderMiddleware()] if record else []
    runtime = Runtime(
        app, transport=transport_url, store=store_url, middleware=[*(middleware or []), *extra]
    )
    columns = (TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    baseline = await snapshot(store_url)
    async with (
        runtime,
        _recording(app, runtime, db_url),
        serve_http(runtime, free_port()) as base_url,
    ):
        if db_url is not None:
            await asyncio.to_thread(
                _write_console_settings,
                data_dir,
                {"app": DEMO_APP, "transport": transport_url, "db": db_url,
                 "store": store_url},
            )  # fmt: skip
        started = time.monotonic()
        with Progress(*columns, console=console, transient=False) as progress:
            submitted = await submit_all(base_url, deliveries, concurrency, progress)
            snap = await wait_for_outcome(store_url, submitted, timeout, progress, baseline)
        elapsed = time.monotonic() - started
        dead = len(await runtime.transport.dead_letters(limit=100_000))
    deleted = None
    if own_namespace and not keep:
        groups = [RECORDER_GROUP] if record else []
        deleted = await delete_namespace(transport_url, app, groups)
    return DemoResult(
        submitted, snap.minus(baseline), elapsed, dead, db_url, transport_url, deleted
    )


async def delete_namespace(url: str, app: App, groups: list[str]) -> str:
    """Delete everything the namespace of ``url`` holds on its broker; returns the namespace.
    The app's groups (and ``groups``) are declared first, so that a broker that cannot list its
    queues (AMQP) deletes theirs too."""
    transport = transport_from_url(url)
    async with transport:
        await declare_groups(transport, app)
        for group in groups:
            await transport.declare_group(group, ())
        await transport.delete_namespace()
    return dict(parse_qsl(urlsplit(url).query)).get("namespace", "")


@contextlib.asynccontextmanager
async def _recording(app: App, runtime: Runtime, db_url: str | None) -> AsyncIterator[None]:
    """The recorder beside the services; on the way out, everything they reported is written
    before it stops."""
    if db_url is None:
        yield
        return
    recorder = Recorder(app, runtime.transport, db_url, poll_interval=0.1)
    await recorder.start()
    try:
        yield
        for mw in runtime.middleware:
            if isinstance(mw, RecorderMiddleware):
                await mw.flush()
        with contextlib.suppress(TimeoutError):
            await recorder.idle(timeout=10.0)
    finally:
        await recorder.stop()


def print_summary(result: DemoResult, console: Console) -> None:
    snap = result.snapshot
    table = Table(title="drone delivery: outcome", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("submitted", str(result.submitted))
    table.add_row("completed", str(snap.statuses["completed"]))
    table.add_row("failed and compensated", str(snap.statuses["failed"]))
    for reason, count in sorted(snap.failure_reasons.items()):
        table.add_row(f"  {reason}", str(count))
    table.add_row("still in flight", str(snap.in_flight))
    table.add_row("drones still reserved", str(snap.drones_reserved))
    table.add_row("packages not released", str(snap.packages_unreleased))
    table.add_row("dead letters", str(result.dead_letters))
    rate = snap.terminal / result.elapsed if result.elapsed else 0.0
    table.add_row("elapsed", f"{result.elapsed:.1f} s")
    table.add_row("throughput", f"{rate:.0f} deliveries/s")
    console.print(table)
    if result.consistent:
        console.print("[green]every delivery ended; every drone is free; nothing is left held[/]")
    else:
        console.print("[red]inconsistent: some deliveries did not end or left resources held[/]")
    if result.deleted_namespace:
        console.print(
            f"deleted the demo's namespace {result.deleted_namespace} from the broker "
            "(--keep keeps it, e.g. for choreograph console)"
        )
    if result.recorder_db:
        command = _invoked_command()
        console.print(
            f"recorded into {result.recorder_db}: see every delivery with "
            f"[bold]{command} console[/] (or {command} trace DELIVERY_ID --db {result.recorder_db})"
        )


def _invoked_command() -> str:
    """The command as the user typed it (``.venv/bin/choreograph`` after ``make demo``), so the
    hint can be pasted as it is; plain ``choreograph`` when run another way."""
    typed = sys.argv[0] if sys.argv else ""
    return typed if Path(typed).name == "choreograph" else "choreograph"
