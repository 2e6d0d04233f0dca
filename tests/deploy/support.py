"""Helpers of the deployment tests: HTTP probes, publishing from the test, the journal."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path

from choreograph.envelope import encode, new_envelope
from choreograph.events import Event
from choreograph.transport import Message, transport_from_url
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


def publish(transport_url: str, events: list[Event], source: str = "source") -> None:
    """Publish ``events`` with the transport alone, as a producer that declares nothing would (a
    participant in another language, a script): they are kept only for the groups that already
    exist, so what a test sees handled afterwards was kept by the declaration it made."""

    async def send() -> None:
        envelopes = [
            new_envelope(e.event_type, e.to_data(), source=source, dataschema=e.dataschema())
            for e in events
        ]
        async with transport_from_url(transport_url) as transport:
            await transport.publish([Message(e.id, e.type, encode(e)) for e in envelopes])

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
