"""The choreography graph, drawn from the declarations alone: services, events, who emits and who
consumes, joins, deadlines and compensations.

``to_mermaid`` and ``to_dot`` return text; ``render`` turns DOT into SVG or PNG with Graphviz's
``dot`` (which must be installed: ``apt-get install graphviz``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Literal

from choreograph.app import App
from choreograph.errors import ConfigurationError
from choreograph.observe.model import IMPLICIT_EVENTS, FlowModel, is_failure_type

EdgeKind = Literal["emits", "consumes", "join", "compensates", "deadline", "timeout", "implicit"]
NodeKind = Literal["service", "event", "runtime"]
RUNTIME = "runtime"


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    label: str
    kind: NodeKind
    failure: bool = False
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    kind: EdgeKind
    label: str = ""


@dataclass(slots=True)
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)

    def add(self, node: Node) -> str:
        self.nodes.setdefault(node.id, node)
        return node.id


def _id(prefix: str, name: str) -> str:
    return prefix + re.sub(r"[^A-Za-z0-9_]", "_", name)


def build_graph(app: App) -> Graph:
    """The graph of ``app``'s declarations."""
    model = FlowModel(app)
    graph = Graph()

    def event(name: str) -> str:
        return graph.add(
            Node(_id("e_", name), name, "event", is_failure_type(name), name in model.terminal)
        )

    def service(name: str) -> str:
        return graph.add(Node(_id("s_", name), name, "service"))

    for name in app.services:
        service(name)
    for name in app.external:
        graph.add(Node(_id("s_", name), f"{name} (external)", "service"))
    for step in model.steps:
        svc = service(step.service)
        within = f" within {step.within:g}s" if step.within else ""
        if step.kind in ("outside", "external"):
            label = "outside handlers" if step.kind == "outside" else "external"
            for name in step.triggers:
                graph.edges.append(Edge(event(name), svc, "consumes", label))
            for name in step.emits:
                graph.edges.append(Edge(svc, event(name), "emits", label))
            continue
        if step.kind in ("handler", "compensation"):
            (trigger,) = step.triggers
            if step.kind == "compensation":
                graph.edges.append(
                    Edge(event(trigger), svc, "compensates", f"{step.name}: undoes {step.undoes}")
                )
            else:
                graph.edges.append(Edge(event(trigger), svc, "consumes", step.name))
        elif step.kind == "join":
            for part in step.triggers:
                graph.edges.append(Edge(event(part), svc, "join", f"join {step.name}{within}"))
            if step.starts_on and step.starts_on not in step.triggers:
                graph.edges.append(
                    Edge(event(step.starts_on), svc, "deadline", f"starts join {step.name}{within}")
                )
        elif step.kind == "deadline":
            expect = " or ".join(step.expect)
            graph.edges.append(
                Edge(
                    event(step.triggers[0]),
                    svc,
                    "deadline",
                    f"deadline {step.name}: {expect}{within}",
                )
            )
        kind: EdgeKind = "timeout" if step.kind in ("deadline", "join_timeout") else "emits"
        label = step.name if kind == "emits" else f"{step.name} expired"
        for name in step.emits:
            graph.edges.append(Edge(svc, event(name), kind, label))
    consumed = model.consumed()
    for cls in IMPLICIT_EVENTS:
        if cls.event_type in consumed:
            runtime = graph.add(Node(RUNTIME, "runtime (a handler gives up)", "runtime"))
            graph.edges.append(Edge(runtime, event(cls.event_type), "implicit", "gave up"))
    graph.edges = _merged(graph.edges)
    return graph


def _merged(edges: list[Edge]) -> list[Edge]:
    """One edge per (source, target, kind), its labels joined: fewer crossing lines."""
    labels: dict[tuple[str, str, EdgeKind], list[str]] = {}
    for edge in edges:
        found = labels.setdefault((edge.source, edge.target, edge.kind), [])
        if edge.label and edge.label not in found:
            found.append(edge.label)
    return [Edge(s, t, k, ", ".join(found)) for (s, t, k), found in labels.items()]


# Mermaid -----------------------------------------------------------------------------------------

_MERMAID_ARROWS = {
    "emits": "-->",
    "consumes": "-->",
    "join": "==>",
    "compensates": "-.->",
    "deadline": "-.->",
    "timeout": "-.->",
    "implicit": "-.->",
}


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;")


def to_mermaid(app: App) -> str:
    graph = build_graph(app)
    lines = ["flowchart LR"]
    for node in graph.nodes.values():
        label = _mermaid_text(node.label)
        if node.kind == "service":
            lines.append(f'    {node.id}(["{label}"]):::service')
        elif node.kind == "runtime":
            lines.append(f'    {node.id}[/"{label}"/]:::runtime')
        else:
            style = "failure" if node.failure else "event"
            extra = ":::terminal" if node.terminal else ""
            lines.append(f'    {node.id}{{{{"{label}"}}}}:::{style}')
            if extra:
                lines.append(f"    class {node.id} terminal")
    for edge in graph.edges:
        arrow = _MERMAID_ARROWS[edge.kind]
        label = f'|"{_mermaid_text(edge.label)}"|' if edge.label else ""
        lines.append(f"    {edge.source} {arrow}{label} {edge.target}")
    lines += [
        "    classDef service fill:#e8f0fe,stroke:#3b5bdb,color:#1c2a5a",
        "    classDef event fill:#ffffff,stroke:#868e96",
        "    classDef failure fill:#fff0f0,stroke:#c92a2a,color:#7a1010",
        "    classDef terminal stroke-width:3px",
        "    classDef runtime fill:#f8f9fa,stroke:#adb5bd,color:#495057",
    ]
    return "\n".join(lines) + "\n"


# Graphviz ----------------------------------------------------------------------------------------

_DOT_EDGES = {
    "emits": "",
    "consumes": "",
    "join": "penwidth=2.5",
    "compensates": 'style=dashed color="#c92a2a" fontcolor="#c92a2a"',
    "deadline": 'style=dotted color="#e67700" fontcolor="#e67700"',
    "timeout": 'style=dotted color="#e67700" fontcolor="#e67700"',
    "implicit": 'style=dashed color="#868e96"',
}


def _dot_text(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(app: App) -> str:
    graph = build_graph(app)
    lines = [
        f"digraph {_dot_text(app.name)} {{",
        "    rankdir=LR;",
        '    node [fontname="Helvetica" fontsize=11];',
        '    edge [fontname="Helvetica" fontsize=9];',
    ]
    for node in graph.nodes.values():
        if node.kind == "service":
            attrs = 'shape=box style="rounded,filled" fillcolor="#e8f0fe" color="#3b5bdb"'
        elif node.kind == "runtime":
            attrs = 'shape=parallelogram style=filled fillcolor="#f8f9fa" color="#adb5bd"'
        else:
            color = '"#c92a2a"' if node.failure else '"#868e96"'
            fill = '"#fff0f0"' if node.failure else '"#ffffff"'
            attrs = f"shape=ellipse style=filled fillcolor={fill} color={color}"
            if node.terminal:
                attrs += " peripheries=2"
        lines.append(f"    {node.id} [label={_dot_text(node.label)} {attrs}];")
    for edge in graph.edges:
        attrs = " ".join(
            filter(
                None,
                [f"label={_dot_text(edge.label)}" if edge.label else "", _DOT_EDGES[edge.kind]],
            )
        )
        lines.append(f"    {edge.source} -> {edge.target} [{attrs}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot_source: str, fmt: Literal["svg", "png"]) -> bytes:
    """Render DOT with Graphviz's ``dot``; a clear error when it is not installed."""
    dot = shutil.which("dot")
    if dot is None:
        raise ConfigurationError(
            f"--format {fmt} needs Graphviz's 'dot' program: install it "
            "(apt-get install graphviz, brew install graphviz), or use --format mermaid or dot"
        )
    done = subprocess.run(
        [dot, f"-T{fmt}"], input=dot_source.encode(), capture_output=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise ConfigurationError(f"dot failed: {done.stderr.decode(errors='replace')[:500]}")
    return done.stdout
