"""The choreography graph as SVG, laid out here (no Graphviz needed), from the declarations.

Columns follow the flow (who emits what, who consumes it); a step that loops back (a
compensation, a service reacting to the end) is drawn as an arc. Two overlays:

* :class:`PathOverlay` — one transaction: what it went through is drawn strong, what it still
  waits for is marked, the rest fades.
* counts — how many times each edge was taken in a window, written on the edge.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from html import escape

from choreograph.app import App
from choreograph.observe.graph import RUNTIME, Edge, Graph, Node, build_graph
from choreograph.observe.model import FlowModel

_RANKING = ("emits", "consumes", "join", "implicit")
_GAP_X, _GAP_Y, _HEIGHT, _PAD = 64, 20, 30, 24
_ARC = 20  # vertical step between arcs, so that their counts do not overlap
_COLORS = {
    "emits": "#868e96",
    "consumes": "#868e96",
    "join": "#3b5bdb",
    "compensates": "#c92a2a",
    "deadline": "#e67700",
    "timeout": "#e67700",
    "implicit": "#adb5bd",
}
_DASH = {"compensates": "6 4", "deadline": "2 4", "timeout": "2 4", "implicit": "5 4"}
_TAKEN, _WAITING = "#1971c2", "#e67700"


@dataclass(frozen=True, slots=True)
class PathOverlay:
    """What one transaction did, by names: event types it published, services that handled
    something, edges taken (``(event type, service)`` and ``(service, event type)``), and the
    services and event types it still waits for."""

    events: frozenset[str] = frozenset()
    services: frozenset[str] = frozenset()
    edges: frozenset[tuple[str, str]] = frozenset()
    waiting_services: frozenset[str] = frozenset()
    waiting_edges: frozenset[tuple[str, str]] = frozenset()
    failed: frozenset[str] = frozenset()
    """Services with a handling that was dead-lettered in this transaction."""


@dataclass(slots=True)
class _Box:
    node: Node
    column: int
    x: float = 0.0
    y: float = 0.0
    width: float = 0.0
    order: float = 0.0
    incoming: list[str] = field(default_factory=list)


def render_graph(
    app: App,
    *,
    overlay: PathOverlay | None = None,
    counts: dict[tuple[str, str], int] | None = None,
) -> str:
    """The graph of ``app`` as an inline ``<svg>`` element."""
    graph = build_graph(app)
    starts = {s.service for s in FlowModel(app).steps if s.kind == "outside"}
    boxes = _layout(graph, starts)
    height = max((b.y + _HEIGHT for b in boxes.values()), default=0) + _PAD
    width = max((b.x + b.width for b in boxes.values()), default=0) + _PAD
    arcs_above, arcs_below = 0, 0
    parts: list[str] = []
    labels: list[tuple[float, float, float]] = []  # counts written so far: centre x, y, width
    written: list[str] = []  # the counts, drawn over every edge so that no line crosses one
    for edge in graph.edges:
        source, target = boxes[edge.source], boxes[edge.target]
        forward = target.column > source.column
        if not forward:
            if edge.kind == "compensates":
                arcs_below += 1
            else:
                arcs_above += 1
        drawn, written_count = _edge(edge, source, target, forward, arcs_above, arcs_below, height,
                             overlay, counts, labels)  # fmt: skip
        parts.append(drawn)
        written.append(written_count)
    parts += written
    top = _PAD + _ARC * arcs_above + (16 if arcs_above else 0)
    bottom = _ARC * arcs_below + (16 if arcs_below else 0)
    for box in boxes.values():
        parts.append(_node(box, overlay))
    view = f"0 {-top} {width:.0f} {height + top + bottom:.0f}"
    return (
        f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" viewBox="{view}" '
        f'width="{width:.0f}" role="img" aria-label="choreography of {escape(app.name)}">'
        f"{_defs()}{''.join(parts)}</svg>"
    )


# layout ------------------------------------------------------------------------------------------


def _layout(graph: Graph, starts: set[str]) -> dict[str, _Box]:
    # Columns follow the forward flow only: reactions to the end of a transaction (tracking,
    # notifications, compensations) and the runtime's own announcements are drawn as arcs.
    ranked = [
        e
        for e in graph.edges
        if e.kind in _RANKING and not graph.nodes[e.source].terminal and e.kind != "implicit"
    ]
    outgoing: dict[str, list[str]] = defaultdict(list)
    incoming: dict[str, list[str]] = defaultdict(list)
    for edge in ranked:
        outgoing[edge.source].append(edge.target)
    fed = {e.target for e in ranked}
    order = sorted(graph.nodes, key=lambda n: (graph.nodes[n].label not in starts, n in fed))
    back = _back_edges(order, outgoing)
    for edge in ranked:
        if (edge.source, edge.target) not in back:
            incoming[edge.target].append(edge.source)
    columns: dict[str, int] = {}

    def column(node: str, trail: frozenset[str] = frozenset()) -> int:
        if node not in columns:
            parents = [p for p in incoming[node] if p not in trail]
            columns[node] = 1 + max((column(p, trail | {node}) for p in parents), default=-1)
        return columns[node]

    for node_id in graph.nodes:
        column(node_id)
    # A node only reached by an arc (a notifier of the end, the runtime's announcement) goes
    # right after what feeds it rather than at the start.
    for _ in range(2):
        for edge in graph.edges:
            if not incoming[edge.target] and graph.nodes[edge.target].label not in starts:
                columns[edge.target] = max(columns[edge.target], columns[edge.source] + 1)
    boxes = {
        node_id: _Box(node, columns[node_id], incoming=incoming[node_id])
        for node_id, node in graph.nodes.items()
    }
    for box in boxes.values():
        box.width = max(96.0, 7.2 * len(box.node.label) + 28)
    by_column: dict[int, list[_Box]] = defaultdict(list)
    for box in boxes.values():
        by_column[box.column].append(box)
    x = float(_PAD)
    for index in sorted(by_column):
        members = by_column[index]
        for position, box in enumerate(members):
            box.order = position
        # Order each column by where its parents sit, so that lines cross less.
        for box in members:
            parents = [boxes[p].order for p in box.incoming if boxes[p].column < index]
            box.order = sum(parents) / len(parents) if parents else box.order
        members.sort(key=lambda b: (b.order, b.node.kind != "service", b.node.label))
        widest = max(b.width for b in members)
        for position, box in enumerate(members):
            box.order = position
            box.x = x + (widest - box.width) / 2
            box.y = _PAD + position * (_HEIGHT + _GAP_Y)
        x += widest + _GAP_X
    # Center shorter columns vertically against the tallest.
    tallest = max(len(m) for m in by_column.values())
    for members in by_column.values():
        shift = (tallest - len(members)) * (_HEIGHT + _GAP_Y) / 2
        for box in members:
            box.y += shift
    return boxes


def _back_edges(order: list[str], outgoing: dict[str, list[str]]) -> set[tuple[str, str]]:
    """Edges that close a cycle, found by depth-first walks from the nodes of ``order`` in turn
    (the flow's entry points first, then the nodes nobody feeds)."""
    state: dict[str, int] = {}
    back: set[tuple[str, str]] = set()

    def walk(node: str) -> None:
        state[node] = 1
        for child in outgoing[node]:
            if state.get(child) == 1:
                back.add((node, child))
            elif child not in state:
                walk(child)
        state[node] = 2

    for node in order:
        if node not in state:
            walk(node)
    return back


# drawing -----------------------------------------------------------------------------------------


def _defs() -> str:
    markers = {"grey": "#868e96", "blue": "#3b5bdb", "red": "#c92a2a", "orange": "#e67700",
               "light": "#adb5bd", "taken": _TAKEN}  # fmt: skip
    return (
        "<defs>"
        + "".join(
            f'<marker id="arrow-{name}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="9" '
            f'markerHeight="9" markerUnits="userSpaceOnUse" orient="auto-start-reverse">'
            f'<path d="M0,0 L10,5 L0,10 z" '
            f'fill="{color}"/></marker>'
            for name, color in markers.items()
        )
        + "</defs>"
    )


def _marker(color: str) -> str:
    return {
        "#868e96": "grey", "#3b5bdb": "blue", "#c92a2a": "red", "#e67700": "orange",
        "#adb5bd": "light", _TAKEN: "taken",
    }.get(color, "grey")  # fmt: skip


def _names(edge: Edge, source: _Box, target: _Box) -> tuple[str, str]:
    return (source.node.label, target.node.label)


def _edge(
    edge: Edge,
    source: _Box,
    target: _Box,
    forward: bool,
    above: int,
    below: int,
    height: float,
    overlay: PathOverlay | None,
    counts: dict[tuple[str, str], int] | None,
    labels: list[tuple[float, float, float]],
) -> tuple[str, str]:
    """The edge, and its count (in a group of its own, the same edge named, or '')."""
    color, width, dash, opacity = _COLORS[edge.kind], 1.4, _DASH.get(edge.kind, ""), 1.0
    if edge.kind == "join":
        width = 2.4
    key = _names(edge, source, target)
    classes = ["edge", edge.kind]
    if overlay is not None:
        if key in overlay.edges:
            color, width, opacity = _TAKEN if edge.kind != "compensates" else color, 2.8, 1.0
            classes.append("taken")
        elif key in overlay.waiting_edges:
            color, width, dash, opacity = _WAITING, 2.4, "5 4", 1.0
            classes.append("waiting")
        else:
            opacity = 0.22
    count = None
    if counts is not None:
        count = counts.get(key, 0)
        if source.node.id == RUNTIME:
            count = sum(n for (_, t), n in counts.items() if t == target.node.label)
        width = 1.2 + min(4.0, math.log10(count + 1) * 1.4) if count else 1.0
        opacity = 1.0 if count else 0.35
    x1, y1 = source.x + source.width, source.y + _HEIGHT / 2
    x2, y2 = target.x, target.y + _HEIGHT / 2
    if forward:
        bend = max(30.0, (x2 - x1) / 2)
        curve = ((x1, y1), (x1 + bend, y1), (x2 - bend, y2), (x2, y2))
        at = 0.5
    elif edge.kind == "compensates":
        sx, tx = source.x + source.width / 2, target.x + target.width / 2
        low = height + _ARC * below
        curve = ((sx, source.y + _HEIGHT), (sx, low), (tx, low), (tx, target.y + _HEIGHT))
        at = 0.3 + 0.1 * (below % 5)
    else:
        sx, tx = source.x + source.width / 2, target.x + target.width / 2
        high = -_ARC * above
        curve = ((sx, source.y), (sx, high), (tx, high), (tx, target.y))
        # Arcs between the same columns share their apex: each arc's count sits at its own
        # place along it, so that the numbers do not pile up.
        at = 0.3 + 0.1 * (above % 5)
    (px, py), (ax, ay), (bx, by), (qx, qy) = curve
    path = f"M{px:.1f},{py:.1f} C{ax:.1f},{ay:.1f} {bx:.1f},{by:.1f} {qx:.1f},{qy:.1f}"
    title = escape(f"{source.node.label} → {target.node.label}: {edge.kind} {edge.label}".strip())
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    named = f'data-from="{escape(key[0])}" data-to="{escape(key[1])}"'
    out = (
        f'<g class="{" ".join(classes)}" opacity="{opacity}" {named}><title>{title}</title>'
        f'<path d="{path}" fill="none" stroke="{color}" stroke-width="{width:.1f}"{dash_attr} '
        f'marker-end="url(#arrow-{_marker(color)})"/></g>'
    )
    if not count:
        return out, ""
    label = f"{count:,}"
    w = 7 * len(label) + 10
    mid = _free_spot(curve, at, w, labels)
    return out, (
        f'<g class="edge-count" {named}><title>{title}</title>'
        f'<rect x="{mid[0] - w / 2:.1f}" y="{mid[1] - 9:.1f}" width="{w}" height="18" rx="9" '
        f'class="count"/><text x="{mid[0]:.1f}" y="{mid[1] + 4:.1f}" '
        f'text-anchor="middle" class="count">{label}</text></g>'
    )


def _free_spot(
    curve: tuple[tuple[float, float], ...],
    at: float,
    w: float,
    labels: list[tuple[float, float, float]],
) -> tuple[float, float]:
    """Where along ``curve`` to write a count ``w`` wide: at ``at``, or the nearest place (in
    tenths of the curve) that no count written before covers; the place is added to ``labels``."""
    tries = [at + step * sign for step in (0.0, 0.1, 0.2, 0.3) for sign in (1, -1)]
    spots = [_bezier(t, *curve) for t in tries if 0.15 <= t <= 0.85]
    free = [
        (x, y) for x, y in spots
        if all(abs(x - lx) >= (w + lw) / 2 + 2 or abs(y - ly) >= 20 for lx, ly, lw in labels)
    ]  # fmt: skip
    x, y = (free or spots or [_bezier(at, *curve)])[0]
    labels.append((x, y, w))
    return x, y


def _bezier(t: float, *points: tuple[float, float]) -> tuple[float, float]:
    """The point at ``t`` (0..1) of a cubic Bézier curve given by its four points."""
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = points
    u = 1 - t
    weights = (u**3, 3 * u * u * t, 3 * u * t * t, t**3)
    return (
        sum(w * x for w, x in zip(weights, (x0, x1, x2, x3), strict=True)),
        sum(w * y for w, y in zip(weights, (y0, y1, y2, y3), strict=True)),
    )


def _node(box: _Box, overlay: PathOverlay | None) -> str:
    node = box.node
    label = node.label
    classes = ["node", node.kind]
    if node.failure:
        classes.append("failure")
    if node.terminal:
        classes.append("terminal")
    opacity = 1.0
    badge = ""
    if overlay is not None:
        name = label
        if (node.kind == "event" and name in overlay.events) or (
            node.kind == "service" and name in overlay.services
        ):
            classes.append("taken")
        elif node.kind == "service" and name in overlay.waiting_services:
            classes.append("waiting")
        else:
            opacity = 0.3
        if node.kind == "service" and name in overlay.waiting_services:
            classes.append("waiting")
            badge = _badge(box, "waiting", "#e67700")
        if node.kind == "service" and name in overlay.failed:
            badge = _badge(box, "dead letter", "#c92a2a")
    radius = 15 if node.kind == "event" else 5
    return (
        f'<g class="{" ".join(classes)}" opacity="{opacity}" data-name="{escape(label)}">'
        f"<title>{escape(node.kind)}: {escape(label)}</title>"
        f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" height="{_HEIGHT}" '
        f'rx="{radius}"/><text x="{box.x + box.width / 2:.1f}" y="{box.y + _HEIGHT / 2 + 4:.1f}" '
        f'text-anchor="middle">{escape(label)}</text>{badge}</g>'
    )


def _badge(box: _Box, text: str, color: str) -> str:
    w = 6.5 * len(text) + 12
    x = box.x + box.width - w / 2
    return (
        f'<rect x="{x:.1f}" y="{box.y - 10:.1f}" width="{w:.1f}" height="16" rx="8" '
        f'fill="{color}" stroke="none"/><text x="{x + w / 2:.1f}" y="{box.y + 2:.1f}" '
        f'text-anchor="middle" class="badge">{text}</text>'
    )
