"""A 3-node NATS JetStream cluster of a test's own, on free loopback ports, for fault tests.

::

    with NatsCluster(tmp_path / "cluster") as cluster:      # started, JetStream has a meta leader
        url = cluster.transport_url(namespace="t1234")      # every node in servers=, replicas=3
        ...
        leader = cluster.stream_leader("t1234_events")      # "n2"
        cluster.kill(leader)                                # SIGKILL: the crash case
        cluster.start_node(leader)                          # same ports, same store: it rejoins
        cluster.wait_ready()

Each node is one ``nats-server`` process with its own client, cluster-route and monitoring ports
and its own store directory under the given root. Leaders and connections are read from the
monitoring endpoints (``/jsz``, ``/connz``, HTTP on 127.0.0.1 only). Every process is stopped by
its own pid when the block ends, whatever happened; nothing touches the shared server on 4222.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.support.brokers import IN_CI
from tests.support.procs import free_port, port_open, wait_until

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
CLUSTER_NAME = "choreograph-test"


def require_nats_server() -> None:
    """Skip (locally) or fail (under CI) when the ``nats-server`` binary is missing."""
    if Path(NATS_SERVER).exists():
        return
    message = f"{NATS_SERVER} not found: the cluster tests start their own nats-server processes"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


class PortTaken(AssertionError):
    """A node could not bind a port chosen for it: another program took it meanwhile."""


@dataclass
class Node:
    """One server of the cluster. Its ports and store survive a kill, so a restart rejoins."""

    name: str
    root: Path
    port: int = field(default_factory=free_port)
    route_port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def monitor(self, endpoint: str, timeout: float = 2.0) -> dict[str, Any] | None:
        """The JSON of a monitoring endpoint (``jsz?consumers=true``), or None if unreachable."""
        if not self.alive():
            return None
        url = f"http://127.0.0.1:{self.monitor_port}/{endpoint}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as answer:
                data: dict[str, Any] = json.loads(answer.read())
                return data
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class NatsCluster:
    """Starts ``size`` clustered nats-server processes and guarantees they end with the block."""

    def __init__(self, root: Path, size: int = 3, extra_config: str = "") -> None:
        require_nats_server()
        self.root = root
        self.extra_config = extra_config
        """Lines added to every node's configuration (``max_payload: 65536``...)."""
        self.nodes = {f"n{i}": Node(f"n{i}", root / f"n{i}") for i in range(1, size + 1)}

    # life cycle -------------------------------------------------------------------------------

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Start every node, then wait until JetStream has a meta leader every node knows.

        A port another program took between its choice and a node's start (test runs share the
        machine) is a fresh start of the whole cluster on new ports, up to three times: each
        node's configuration names the others' route ports."""
        for attempt in range(1, 4):
            try:
                for name in self.nodes:
                    self.start_node(name)
                break
            except PortTaken:
                if attempt == 3:
                    raise
                self.stop()
                for node in self.nodes.values():
                    node.port, node.route_port, node.monitor_port = (free_port() for _ in "abc")
                    shutil.rmtree(node.root, ignore_errors=True)
        self.wait_ready(timeout)

    def start_node(self, name: str) -> None:
        """Start (or restart, after :meth:`kill`) one node on its ports, with its store."""
        node = self.nodes[name]
        if node.alive():
            return
        node.root.mkdir(parents=True, exist_ok=True)
        config = node.root / "server.conf"
        config.write_text(self._config(node))
        with node.log.open("ab") as sink:
            node.process = subprocess.Popen(
                [NATS_SERVER, "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        node.starts += 1

        def listening() -> bool:
            if not node.alive():
                output = node.output()
                if "address already in use" in output:
                    raise PortTaken(f"nats-server {name} exited at start:\n{output}")
                raise AssertionError(f"nats-server {name} exited at start:\n{output}")
            return port_open(node.port) and port_open(node.monitor_port)

        wait_until(listening, 30, f"nats-server {name} to listen on {node.port}")

    def kill(self, name: str) -> None:
        """SIGKILL one node: it dies at once, holding whatever it held."""
        node = self.nodes[name]
        if node.process is not None and node.alive():
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(10)

    def stop(self) -> None:
        """Stop every node by its pid (SIGKILL: the store is thrown away with the root)."""
        for node in self.nodes.values():
            if node.process is not None and node.alive():
                node.process.send_signal(signal.SIGKILL)
                node.process.wait(10)

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Wait until every running node reports the same meta leader (and a healthy JetStream);
        returns the leader's name."""
        wait_until(
            lambda: self._agreed_meta_leader() is not None,
            timeout,
            f"a JetStream meta leader known to every running node of {sorted(self.nodes)}",
            interval=0.2,
        )
        leader = self._agreed_meta_leader()
        assert leader is not None
        return leader

    def _agreed_meta_leader(self) -> str | None:
        leaders = set()
        for node in self.running():
            jsz = node.monitor("jsz")
            healthz = node.monitor("healthz?js-enabled-only=true")
            if jsz is None or healthz is None or healthz.get("status") != "ok":
                return None
            leaders.add((jsz.get("meta_cluster") or {}).get("leader") or "")
        if len(leaders) != 1 or "" in leaders:
            return None
        return leaders.pop()

    def _config(self, node: Node) -> str:
        routes = ", ".join(
            f"nats://127.0.0.1:{other.route_port}"
            for other in self.nodes.values()
            if other is not node
        )
        return (
            f"server_name: {node.name}\n"
            f"listen: 127.0.0.1:{node.port}\n"
            f"http: 127.0.0.1:{node.monitor_port}\n"
            f'jetstream {{ store_dir: "{node.store}" }}\n'
            f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{node.route_port}\n"
            f"  routes: [{routes}]\n}}\n"
            f"{self.extra_config}\n"
        )

    # addresses -----------------------------------------------------------------------------------

    def running(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.alive()]

    def servers(self, first: str | None = None) -> list[str]:
        """Every node's client URL, ``first`` (a node name) first."""
        order = sorted(self.nodes, key=lambda name: name != first)
        return [self.nodes[name].url for name in order]

    def transport_url(self, namespace: str, first: str | None = None, **options: object) -> str:
        """A ``nats://`` URL for the transport naming every node (``servers=``), with
        ``replicas`` set to the cluster's size and limits retention (a day) unless given:
        nats-server 2.9 loses messages of replicated interest-retention streams, and the transport
        refuses that combination."""
        head, *rest = self.servers(first)
        query: dict[str, object] = {
            "namespace": namespace,
            "replicas": len(self.nodes),
            "retention": "limits",
            "max_age": 86400,
        }
        query.update(options)
        query["servers"] = ",".join(rest)
        return f"{head}?{urlencode({k: str(v) for k, v in query.items()}, safe=':/,')}"

    # leaders -------------------------------------------------------------------------------------

    def meta_leader(self) -> str | None:
        for node in self.running():
            leader = ((node.monitor("jsz") or {}).get("meta_cluster") or {}).get("leader")
            if leader:
                return str(leader)
        return None

    def _details(self) -> list[dict[str, Any]]:
        """Stream details (with their consumers) as every running node sees them."""
        found: list[dict[str, Any]] = []
        for node in self.running():
            jsz = node.monitor("jsz?accounts=true&streams=true&consumers=true&config=true")
            for account in (jsz or {}).get("account_details") or []:
                found += account.get("stream_detail") or []
        return found

    def stream_leader(self, stream: str) -> str | None:
        """The node leading ``stream``, as a running node reports it (None while electing)."""
        for detail in self._details():
            if detail.get("name") == stream:
                leader = (detail.get("cluster") or {}).get("leader")
                if leader:
                    return str(leader)
        return None

    def consumer_leaders(self, stream: str) -> dict[str, str]:
        """Durable consumer name -> the node leading it, for the consumers of ``stream``."""
        leaders: dict[str, str] = {}
        for detail in self._details():
            if detail.get("name") != stream:
                continue
            for consumer in detail.get("consumer_detail") or []:
                leader = (consumer.get("cluster") or {}).get("leader")
                if leader and consumer.get("name"):
                    leaders.setdefault(str(consumer["name"]), str(leader))
        return leaders

    def consumer_leader(self, stream: str, consumer: str) -> str | None:
        return self.consumer_leaders(stream).get(consumer)

    def connections(self, name_contains: str = "") -> dict[str, int]:
        """Node name -> client connections whose name contains ``name_contains`` (the
        transport names its connection ``choreograph-<namespace>`` by default)."""
        counts: dict[str, int] = {}
        for node in self.running():
            connz = node.monitor("connz?limit=10000") or {}
            counts[node.name] = sum(
                name_contains in (conn.get("name") or "") for conn in connz.get("connections") or []
            )
        return counts

    def wait_stream_leader(self, stream: str, timeout: float = 60.0) -> str:
        """Wait until ``stream`` has a leader on a running node; returns its name."""
        alive = {node.name for node in self.running()}
        wait_until(
            lambda: self.stream_leader(stream) in alive,
            timeout,
            f"a leader of stream {stream} among {sorted(alive)}",
            interval=0.2,
        )
        leader = self.stream_leader(stream)
        assert leader is not None
        return leader
