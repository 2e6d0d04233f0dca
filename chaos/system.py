"""The drone delivery as the chaos run drives it: one OS process per service member (package and
drone-scheduler with two replicas each), on the sqlite bus with sqlite stores, or on a 3-node NATS
JetStream cluster with PostgreSQL stores; members killed with SIGKILL and started again.

Processes are started through :class:`tests.support.procs.Procs` (killed by pid when the run
ends, whatever happened); the cluster through :class:`tests.support.nats_cluster.NatsCluster`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from choreograph.demo.inspect_state import SERVICES, Snapshot, read_snapshot
from choreograph.store import store_from_url
from choreograph.transport import DeadLetter, transport_from_url

if TYPE_CHECKING:
    from tests.support.nats_cluster import NatsCluster
from tests.support.procs import Proc, Procs, free_port

APP = "choreograph.demo.app:create_app"
ASGI = "choreograph.demo.ingestion:create_http_app"
REPLICAS = {"ingestion": 1, "package": 2, "drone-scheduler": 2, "delivery": 1, "notification": 1}
JOURNAL = "tests.support.procs:journal"
PG_URL = "postgresql://127.0.0.1:5432/test"
CONFIGURATIONS = ("sqlite", "nats")


@dataclass
class Member:
    """One process of a service (``package#2``); a restart replaces its process."""

    name: str
    service: str
    proc: Proc | None = None
    starts: int = 0
    killed: list[Proc] = field(default_factory=list)


@dataclass
class System:
    root: Path
    procs: Procs
    transport_url: str
    store_url: str
    """Template with ``{service}``."""
    lease: float = 3.0
    port: int = field(default_factory=free_port)
    members: dict[str, Member] = field(default_factory=dict)
    failed_starts: list[tuple[str, str]] = field(default_factory=list)
    """(member, last line of its output) of every start that failed."""

    def __post_init__(self) -> None:
        (self.root / "journal").mkdir(parents=True, exist_ok=True)
        for service, count in REPLICAS.items():
            for n in range(1, count + 1):
                name = service if count == 1 else f"{service}#{n}"
                self.members[name] = Member(name, service)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def journals(self) -> list[Path]:
        return sorted((self.root / "journal").glob("*.log"))

    def start(self, member: Member) -> Proc:
        """Start the member's process (a fresh journal file per start); returns at once."""
        member.starts += 1
        http = member.service == "ingestion"
        tag = member.name.replace("#", "-")
        journal = self.root / "journal" / f"{tag}-{member.starts}.log"
        member.proc = self.procs.run(
            APP,
            member.service,
            transport=self.transport_url,
            store=self.store_url,
            lease=self.lease,
            asgi=ASGI if http else None,
            port=self.port if http else None,
            options=("--middleware", JOURNAL),
            env={"PROCS_JOURNAL": str(journal)},
        )
        return member.proc

    async def ready(self, member: Member, timeout: float = 120.0) -> None:
        assert member.proc is not None
        port = self.port if member.service == "ingestion" else None
        await asyncio.to_thread(Procs.ready, member.proc, port, timeout)

    async def launch(self, member: Member, tries: int = 5) -> None:
        """Start the member and wait until it runs. A start that fails (the process exits, or
        never gets ready) is a crash, recorded in :attr:`failed_starts`; it is started again,
        as a supervisor would, up to ``tries`` times."""
        for attempt in range(1, tries + 1):
            proc = self.start(member)
            try:
                await self.ready(member)
                return
            except (AssertionError, TimeoutError) as exc:
                last = (str(exc).strip().splitlines() or ["?"])[-1]
                self.failed_starts.append((member.name, last[:300]))
                if proc.alive():
                    proc.kill()
                member.killed.append(proc)  # accounted for here, not as an unexpected exit
                await asyncio.sleep(min(2.0 * attempt, 10.0))
        raise RuntimeError(f"{member.name} did not start in {tries} tries")

    async def start_all(self) -> None:
        await asyncio.gather(*(self.launch(m) for m in self.members.values()))

    def kill(self, member: Member) -> None:
        assert member.proc is not None
        member.proc.kill()
        member.killed.append(member.proc)

    def unexpected_exits(self) -> list[tuple[str, int]]:
        """Processes that ended although nobody killed or stopped them: (member, exit code)."""
        found = []
        for member in self.members.values():
            proc = member.proc
            if proc is not None and not proc.alive() and proc not in member.killed:
                found.append((member.name, proc.popen.returncode))
        return found

    def tracebacks(self) -> dict[str, int]:
        """Tracebacks printed in each member's logs (every process it had), but those of a
        handler asking on purpose to be retried (``RetryLater``, logged as a warning)."""
        counts: dict[str, int] = {}
        for proc in self.procs.started:
            n = sum(1 for error in _logged_errors(proc.output()) if not error.startswith(_ASKED))
            if n:
                counts[proc.name] = counts.get(proc.name, 0) + n
        return counts

    def stop_all(self) -> list[tuple[str, int]]:
        """SIGTERM every running member; returns those that did not exit with 0."""
        failed = []
        for member in self.members.values():
            proc = member.proc
            if proc is not None and proc.alive():
                try:
                    code = proc.stop(timeout=30)
                except AssertionError:
                    code = -9
                if code != 0:
                    failed.append((member.name, code))
        return failed

    # reading the outcome -------------------------------------------------------------------------


class Readers:
    """The stores of ingestion, drone-scheduler and package, opened once for the whole run (after
    the services created them): reading them often never opens a connection pool again."""

    def __init__(self, store_url: str, transport_url: str) -> None:
        self._stores = {s: store_from_url(store_url, s) for s in SERVICES}
        self._transport_url = transport_url

    async def __aenter__(self) -> Readers:
        for store in self._stores.values():
            await store.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for store in self._stores.values():
            with contextlib.suppress(Exception):
                await store.close()

    async def terminal(self) -> int:
        """Deliveries ended, by ingestion's store (cheap to poll)."""
        async with self._stores["ingestion"].transaction() as tx:
            done = await tx.count("delivery", {"status": "completed"})
            return done + await tx.count("delivery", {"status": "failed"})

    async def statuses(self, ids: set[str]) -> dict[str, str]:
        """Ingestion's status of each of ``ids`` it knows."""
        async with self._stores["ingestion"].transaction() as tx:
            docs = await tx.find("delivery", limit=10_000_000)
        return {key: str(doc.get("status")) for key, doc in docs if key in ids}

    async def snapshot(self) -> Snapshot:
        return await read_snapshot(self._stores)

    async def dead_letters(self) -> list[DeadLetter]:
        async with transport_from_url(self._transport_url) as transport:
            return await transport.dead_letters(None, 1_000_000)


_ASKED = ("choreograph.errors.RetryLater",)


def _logged_errors(output: str) -> Iterator[str]:
    """The last line (the exception) of every traceback in ``output``."""
    inside = False
    last = ""
    for line in output.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            inside, last = True, ""
        elif inside and line and not line.startswith((" ", "\t")):
            if line.startswith("During handling") or line.startswith("The above exception"):
                continue
            last = line
            inside = False
            yield last


# configurations ----------------------------------------------------------------------------------


@contextlib.contextmanager
def sqlite_setup(root: Path) -> Iterator[tuple[str, str, NatsCluster | None]]:
    """The embedded bus and one SQLite store file per service (replicas share it)."""
    yield f"sqlite:///{root}/bus.db", f"sqlite:///{root}/{{service}}.db", None


@contextlib.contextmanager
def nats_setup(root: Path) -> Iterator[tuple[str, str, NatsCluster | None]]:
    """A 3-node JetStream cluster of the run's own (replicas=3) and PostgreSQL stores in schemas
    of the run's own (dropped afterwards)."""
    from tests.support.nats_cluster import NatsCluster, require_nats_server  # (imports pytest)

    require_nats_server()
    prefix = f"chaos{uuid.uuid4().hex[:8]}"
    with NatsCluster(root / "nats") as cluster:
        url = cluster.transport_url(namespace=prefix)
        try:
            yield url, f"{PG_URL}?schema={prefix}_{{service}}", cluster
        finally:
            asyncio.run(_drop_schemas(prefix))


async def _drop_schemas(prefix: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    with contextlib.suppress(Exception):
        conn = await asyncpg.connect(PG_URL)
        try:
            rows = await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"{prefix}%"
            )
            for row in rows:
                await conn.execute(f'DROP SCHEMA "{row["nspname"]}" CASCADE')
        finally:
            await conn.close()
