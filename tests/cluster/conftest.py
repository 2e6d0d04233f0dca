"""Fixtures of the cluster fault tests: a 3-node NATS JetStream cluster of the test's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nats_cluster import NatsCluster


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three clustered nats-server processes on free loopback ports, JetStream ready; stopped by
    pid when the test ends."""
    with NatsCluster(tmp_path / "cluster") as cluster:
        yield cluster
