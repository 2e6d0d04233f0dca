"""``choreograph lint`` flags each problem on small faulty apps and passes a good one;
``choreograph graph`` draws services, events, joins, deadlines and compensations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from choreograph import App, Context, Event, Parts, Service
from choreograph.cli import main
from choreograph.observe.graph import build_graph, to_dot, to_mermaid
from choreograph.observe.lint import lint
from tests.observe.shop import build_app
from tests.support.commands import require_command


class Started(Event):
    key: str


class Middle(Event):
    key: str


class Other(Event):
    key: str


class Finished(Event):
    key: str


class Orphan(Event):
    key: str


class ThingFailed(Event):
    key: str


class Never(Event):
    key: str


def codes(app: App) -> dict[str, str]:
    return {f.code: f.severity for f in lint(app)}


def faulty(*services: Service, terminal: tuple[type[Event], ...] = (Finished,)) -> App:
    return App("faulty", services, terminal=terminal)


def test_a_good_app_passes() -> None:
    assert lint(build_app()) == []
    result = CliRunner().invoke(main, ["lint", "tests.observe.shop:app"])
    assert result.exit_code == 0 and "0 error(s), 0 warning(s)" in result.output


def test_an_event_consumed_that_nobody_emits_is_an_error() -> None:
    svc = Service("svc")

    @svc.on(Never, emits=[Finished])
    async def waits(event: Never, ctx: Context) -> None: ...

    assert codes(faulty(svc))["never-emitted"] == "error"
    # declared as emitted from outside handlers (an HTTP API): fine
    api = Service("api", emits=[Never])
    assert "never-emitted" not in codes(faulty(svc, api))


def test_an_event_emitted_that_nobody_consumes_is_a_warning_and_a_failure_an_error() -> None:
    svc = Service("svc", emits=[Started])

    @svc.on(Started, emits=[Orphan, Finished, ThingFailed])
    async def go(event: Started, ctx: Context) -> None: ...

    found = {(f.code, f.subject): f.severity for f in lint(faulty(svc))}
    assert found[("never-consumed", "Orphan")] == "warning"
    assert found[("never-consumed", "ThingFailed")] == "error"
    assert ("never-consumed", "Finished") not in found  # terminal: the end of the flow


def test_a_terminal_failure_nobody_compensates_is_a_warning() -> None:
    svc = Service("svc", emits=[Started])

    @svc.on(Started, emits=[Finished, ThingFailed])
    async def go(event: Started, ctx: Context) -> None: ...

    found = codes(faulty(svc, terminal=(Finished, ThingFailed)))
    assert found["uncompensated-failure"] == "warning"
    assert found["no-compensations"] == "warning"
    assert found["handler-failures-unhandled"] == "warning"


def test_a_join_without_deadline_is_an_error_and_a_timeout_nobody_handles_too() -> None:
    svc = Service("svc", emits=[Started, Middle])

    @svc.join(Started, Middle, emits=[Finished])
    async def both(parts: Parts, ctx: Context) -> None: ...

    assert codes(faulty(svc))["join-without-deadline"] == "error"

    timed = Service("timed", emits=[Started, Middle])

    @timed.join(Started, Middle, emits=[Finished], within=5)
    async def both_in_time(parts: Parts, ctx: Context) -> None: ...

    found = codes(faulty(timed))
    assert "join-without-deadline" not in found
    assert found["join-timeout-unhandled"] == "error"


def test_a_cycle_is_a_warning() -> None:
    svc = Service("svc", emits=[Started])

    @svc.on(Started, emits=[Middle])
    async def one(event: Started, ctx: Context) -> None: ...

    @svc.on(Middle, emits=[Other, Finished])
    async def two(event: Middle, ctx: Context) -> None: ...

    @svc.on(Other, emits=[Middle])
    async def three(event: Other, ctx: Context) -> None: ...

    (cycle,) = [f for f in lint(faulty(svc)) if f.code == "cycle"]
    assert cycle.severity == "warning" and "Middle → Other → Middle" in cycle.message


def test_lint_cli_exit_codes_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "faulty_app.py"
    module.write_text(
        "from choreograph import App, Context, Event, Service\n"
        "class Ask(Event):\n    key: str\n"
        "class Done(Event):\n    key: str\n"
        "svc = Service('svc')\n"
        "@svc.on(Ask, emits=[Done])\n"
        "async def go(event: Ask, ctx: Context) -> None: ...\n"
        "app = App('faulty', [svc], terminal=[Done])\n"
    )
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    text = runner.invoke(main, ["lint", "faulty_app:app"])
    assert text.exit_code == 1 and "never-emitted" in text.output

    findings = json.loads(runner.invoke(main, ["lint", "faulty_app:app", "--json"]).output)
    assert {"severity": "error", "code": "never-emitted"}.items() <= findings[0].items()

    strict = runner.invoke(main, ["lint", "--strict", "choreograph.demo.app:create_app"])
    assert strict.exit_code in (0, 1)
    unknown = runner.invoke(main, ["lint", "no_such_module:app"])
    assert unknown.exit_code == 2 and "cannot import app module" in unknown.output


# graph -------------------------------------------------------------------------------------------


def test_graph_has_services_events_joins_deadlines_and_compensations() -> None:
    graph = build_graph(build_app())
    kinds = {(e.source, e.target, e.kind) for e in graph.edges}
    assert ("s_shop", "e_OrderPlaced", "emits") in kinds
    assert ("e_OrderPlaced", "s_stock", "consumes") in kinds
    assert ("e_StockReserved", "s_shipping", "join") in kinds
    assert ("e_OrderFailed", "s_stock", "compensates") in kinds
    assert ("s_shipping", "e_choreograph_JoinTimedOut", "timeout") in kinds
    assert graph.nodes["e_OrderFailed"].failure and graph.nodes["e_OrderFailed"].terminal

    mermaid = to_mermaid(build_app())
    assert mermaid.startswith("flowchart LR")
    assert 'e_StockReserved ==>|"join ship within 300s"| s_shipping' in mermaid
    assert 'e_OrderFailed -.->|"release: undoes reserve"| s_stock' in mermaid
    dot = to_dot(build_app())
    assert dot.startswith('digraph "shop"') and "e_OrderFailed -> s_stock" in dot


def test_graph_cli_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    out = tmp_path / "shop.mmd"
    result = runner.invoke(main, ["graph", "tests.observe.shop:app", "-o", str(out)])
    assert result.exit_code == 0 and out.read_text().startswith("flowchart LR")
    dot = runner.invoke(main, ["graph", "tests.observe.shop:app", "--format", "dot"])
    assert dot.output.startswith('digraph "shop"')

    monkeypatch.setenv("PATH", str(tmp_path))  # no Graphviz here
    missing = runner.invoke(main, ["graph", "tests.observe.shop:app", "-f", "svg"])
    assert missing.exit_code == 1 and "needs Graphviz's 'dot'" in missing.output


def test_graph_cli_draws_svg_and_png_with_graphviz(tmp_path: Path) -> None:
    # given Graphviz's dot (installed by .ci/run; locally the test says how to install it)
    require_command("dot")
    runner = CliRunner()

    # when the graph is drawn as SVG and as PNG
    svg, png = tmp_path / "shop.svg", tmp_path / "shop.png"
    as_svg = runner.invoke(main, ["graph", "tests.observe.shop:app", "-f", "svg", "-o", str(svg)])
    as_png = runner.invoke(main, ["graph", "tests.observe.shop:app", "-f", "png", "-o", str(png)])

    # then both files are real drawings of the shop's services
    assert as_svg.exit_code == 0, as_svg.output
    assert as_png.exit_code == 0, as_png.output
    drawing = svg.read_text()
    assert drawing.lstrip().startswith("<?xml") and "<svg" in drawing
    assert "stock" in drawing and "OrderFailed" in drawing
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png.read_bytes()) > 1_000
