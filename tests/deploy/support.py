"""Helpers of the deployment tests: HTTP probes, publishing from the test, the journal."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path

from choreograph.app import App
from choreograph.events import Event
from choreograph.runtime.runner import Runtime
from tests.deploy.apps import app
from tests.support.procs import read_journal

APP = "tests.deploy.apps:app"
JOURNAL = ["--middleware", "tests.support.procs:journal"]


def probe(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path; (0, error) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def publish(
    transport_url: str,
    events: list[Event],
    tmp_path: Path,
    of: App = app,
    source: str = "source",
) -> None:
    """Publish ``events`` as the service ``source`` of app ``of`` would, from the test's
    process (declaring the app's groups first, as :meth:`Runtime.publish` does)."""

    async def send() -> None:
        store = f"sqlite:///{tmp_path}/{{service}}.db"
        runtime = Runtime(of, transport=transport_url, store=store)
        try:
            for event in events:
                await runtime.publish(event, source=source)
        finally:
            await runtime.transport.close()

    asyncio.run(send())


def handled(journal: Path, service: str) -> set[str]:
    """Event ids ``service`` finished handling (outcome done), as its journal says."""
    return {
        entry.event_id
        for entry in read_journal(journal)
        if entry.kind == "end" and entry.service == service and entry.outcome == "done"
    }


def started(journal: Path, service: str) -> set[str]:
    return {e.event_id for e in read_journal(journal) if e.kind == "start" and e.service == service}
