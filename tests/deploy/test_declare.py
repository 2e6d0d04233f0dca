"""``choreograph declare``: an app's groups exist before any replica runs, and declaring again
changes nothing; per transport, on the real engines."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from choreograph.transport import transport_from_url
from tests.conftest import transport_params
from tests.deploy.apps import Letter, Parcel
from tests.deploy.inspect_bus import declared_objects
from tests.deploy.support import APP, JOURNAL, handled, publish
from tests.support.procs import Procs, wait_until

GROUPS = ["counter", "archive"]


@pytest.fixture(params=transport_params(("sqlite", "nats", "amqp", "redis")))
def transport_name(request: pytest.FixtureRequest) -> str:
    from tests.support.brokers import BROKERS

    name: str = request.param
    if name in BROKERS:
        BROKERS[name].require()
    return name


async def lags(url: str) -> dict[str, int | None]:
    transport = transport_from_url(url)
    async with transport:
        return {group: await transport.lag(group) for group in GROUPS}


async def delete_namespace(url: str) -> None:
    transport = transport_from_url(url)
    async with transport:
        if url.startswith("amqp"):
            await transport.delete_namespace(GROUPS)  # type: ignore[call-arg]
        else:
            await transport.delete_namespace()


def declare(procs: Procs, url: str) -> str:
    proc = procs.start("declare", ["declare", "--app", APP, "--transport", url])
    assert proc.wait(120) == 0, proc.output()
    return proc.output()


def test_declare_twice_then_a_replica_handles_what_was_published_meanwhile(
    transport_url: str, tmp_path: Path
) -> None:
    journal = tmp_path / "journal.log"
    try:
        with Procs(tmp_path / "logs") as procs:
            # given the app declared on a bus where nothing of it existed
            assert asyncio.run(lags(transport_url)) == {"counter": None, "archive": None}
            output = declare(procs, transport_url)
            assert "declared counter: Letter, Parcel" in output
            assert "declared archive: Parcel" in output
            assert "declared source" not in output  # it only emits: no group
            first = asyncio.run(declared_objects(transport_url, GROUPS))
            assert asyncio.run(lags(transport_url)) == {"counter": 0, "archive": 0}
            # and events published while no service runs
            events = [Parcel(number=i) for i in range(10)] + [Letter(number=i) for i in range(5)]
            publish(transport_url, events)
            assert asyncio.run(lags(transport_url)) == {"counter": 15, "archive": 10}
            # when the app is declared again
            declare(procs, transport_url)
            # then nothing changed: the same objects, set the same way, still holding the events
            assert asyncio.run(declared_objects(transport_url, GROUPS)) == first
            assert asyncio.run(lags(transport_url)) == {"counter": 15, "archive": 10}
            # and once a replica of each service starts, every event is handled
            replica = procs.run(APP, "counter", transport=transport_url,
                                store=f"sqlite:///{tmp_path}/{{service}}.db",
                                options=["--service", "archive", *JOURNAL],
                                env={"PROCS_JOURNAL": str(journal)})  # fmt: skip
            wait_until(
                lambda: (
                    len(handled(journal, "counter")) == 15
                    and len(handled(journal, "archive")) == 10
                ),
                90,
                "every event published before the replica to be handled",
            )
            assert replica.stop() == 0, replica.output()
            assert handled(journal, "archive") <= handled(journal, "counter")
            assert asyncio.run(lags(transport_url)) == {"counter": 0, "archive": 0}
    finally:
        if not transport_url.startswith("sqlite"):
            asyncio.run(delete_namespace(transport_url))
