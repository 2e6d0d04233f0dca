"""A 3-node NATS JetStream cluster of the benchmark's own, on free loopback ports.

The cluster is the one the cluster tests start (``tests/support/nats_cluster.py``): three
``nats-server`` processes with their own ports and stores under the run's scratch directory,
stopped by their pids when the block ends. Its transport URL names every node and asks for
``replicas=3`` with limits retention (a day): nats-server 2.9 loses messages of replicated
interest-retention streams, and the transport refuses that combination (docs/transport-nats.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from benchmarks.harness import BenchError

TRANSPORT = "nats-cluster"
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
