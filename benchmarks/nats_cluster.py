"""A 3-node NATS JetStream cluster of the benchmark's own, on free loopback ports, and a single
node of its own with the same settings to compare it with.

The cluster is the one the cluster tests start (``tests/support/nats_cluster.py``): three
``nats-server`` processes with their own ports and stores under the run's scratch directory,
stopped by their pids when the block ends. Its transport URL names every node and asks for
``replicas=3`` with limits retention (a day): nats-server 2.9 loses messages of replicated
interest-retention streams, and the transport refuses that combination (docs/transport-nats.md).
The single node (``nats-node``) runs the same binary with the same URL options but ``replicas=1``,
so that the ratio measures replication alone: not the shared server's other clients, not the
retention.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from benchmarks.harness import BenchError

TRANSPORT = "nats-cluster"
NODE = "nats-node"
SIZE = 3


@contextlib.asynccontextmanager
async def cluster_url(root: Path, namespace: str) -> AsyncIterator[str]:
    """Start a cluster under ``root``; yield a transport URL on it; stop every node."""
    from tests.support import nats_cluster

    if not await asyncio.to_thread(Path(nats_cluster.NATS_SERVER).exists):
        raise BenchError(f"{nats_cluster.NATS_SERVER} not found: the cluster needs nats-server")
    cluster = nats_cluster.NatsCluster(root, size=SIZE)
    try:
        await asyncio.to_thread(cluster.start)
        yield cluster.transport_url(namespace)
    finally:
        await asyncio.to_thread(cluster.stop)


@contextlib.asynccontextmanager
async def node_url(root: Path, namespace: str) -> AsyncIterator[str]:
    """Start one standalone JetStream server under ``root``; yield a transport URL on it with
    the cluster's options but one replica; stop it by its pid."""
    from tests.support import nats_cluster, procs

    if not await asyncio.to_thread(Path(nats_cluster.NATS_SERVER).exists):
        raise BenchError(f"{nats_cluster.NATS_SERVER} not found: the node needs nats-server")
    port = procs.free_port()
    store = root / "store"
    await asyncio.to_thread(store.mkdir, parents=True, exist_ok=True)
    argv = [nats_cluster.NATS_SERVER, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)]
    server = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        await asyncio.to_thread(
            procs.wait_until, lambda: procs.port_open(port), 30, f"nats-server on {port}"
        )
        yield (
            f"nats://127.0.0.1:{port}?namespace={namespace}&replicas=1&retention=limits"
            "&max_age=86400"
        )
    finally:
        if server.returncode is None:
            server.terminate()
            await server.wait()
