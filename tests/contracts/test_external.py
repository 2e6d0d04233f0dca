"""Outside participants declared on the App: lint, the graph, the console's drawing, AsyncAPI and
the ``trace`` overlay treat them as participants; the runtime declares their groups."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from click.testing import CliRunner

from choreograph import App, ConfigurationError, Event, External, Service
from choreograph.cli import main
from choreograph.console import ConsoleSettings, create_console_app
from choreograph.console.svg import render_graph
from choreograph.envelope import encode, new_envelope
from choreograph.observe.asyncapi import asyncapi_document
from choreograph.observe.flows import expectations
from choreograph.observe.graph import build_graph, to_mermaid
from choreograph.observe.lint import lint
from choreograph.observe.model import FlowModel
from choreograph.observe.recorder import Recorder
from choreograph.runtime.runner import declare_groups
from choreograph.transport import Delivery, Failure, Message, transport_from_url
from choreograph.transports.memory import MemoryTransport
from tests.contracts.shop import OrderPlaced, build

app = build()
undeclared = build(with_billing=False)


def test_lint_passes_an_app_with_an_external_participant() -> None:
    # given the same app without the declaration: its events look unpublished and unconsumed
    without = {(f.code, f.subject) for f in lint(undeclared)}
    assert ("never-emitted", "InvoiceIssued") in without
    assert ("never-consumed", "OrderPlaced") in without
    bad = CliRunner().invoke(main, ["lint", "tests.contracts.test_external:undeclared"])
    assert bad.exit_code == 1

    # when billing is declared as an external participant
    findings = lint(app)

    # then lint has no error and says nothing about billing's events
    assert [f for f in findings if f.severity == "error"] == []
    assert not {f.subject for f in findings} & {"OrderPlaced", "InvoiceIssued"}
    result = CliRunner().invoke(main, ["lint", "tests.contracts.test_external:app"])
    assert result.exit_code == 0, result.output


def test_the_graph_and_the_console_draw_the_external_participant() -> None:
    graph = build_graph(app)
    assert graph.nodes["s_billing"].label == "billing (external)"
    edges = {(e.source, e.target, e.kind) for e in graph.edges}
    assert ("e_OrderPlaced", "s_billing", "consumes") in edges
    assert ("s_billing", "e_InvoiceIssued", "emits") in edges
    assert "billing (external)" in to_mermaid(app)
    assert "billing (external)" in render_graph(app)


def test_asyncapi_has_the_external_participants_operations() -> None:
    doc = asyncapi_document(app)
    ops = doc["operations"]
    assert ops["billing.receive.OrderPlaced"]["x-choreograph-steps"] == [
        {"name": "external", "kind": "external"}
    ]
    assert ops["billing.send.InvoiceIssued"]["action"] == "send"
    tags = {t["name"]: t["description"] for t in doc["info"]["tags"]}
    assert "external" in tags["billing"]


def row(event_id: str, type_: str, cause: str | None, handlings: list[Any]) -> dict[str, Any]:
    return {"id": event_id, "type": type_, "causation_id": cause, "time": time.time(),
            "handlings": handlings, "source": "x", "data": {}}  # fmt: skip


def test_trace_shows_the_external_step_without_blocking_and_what_it_emitted() -> None:
    model = FlowModel(app)
    placed = row("e1", "OrderPlaced", None, [])

    # given an order nobody outside answered yet
    (waiting,) = expectations(model, [placed], False, {"shipping"}, time.time())
    assert (waiting["service"], waiting["status"], waiting["blocking"]) == (
        "billing", "external", False
    )  # fmt: skip

    # when billing's invoice arrives (caused by the order)
    invoice = row("e2", "InvoiceIssued", "e1", [])
    rows = expectations(model, [placed, invoice], False, {"shipping"}, time.time())
    billing = next(r for r in rows if r["service"] == "billing")
    assert billing["detail"] == "emitted InvoiceIssued"
    # and shipping, which the app runs, is still expected to react
    assert any(r["service"] == "shipping" and r["status"] == "pending" for r in rows)


async def test_the_runtime_declares_the_external_participants_group() -> None:
    # given the app's groups declared, and an order published before billing ever connected
    transport = MemoryTransport()
    await declare_groups(transport, app)
    await transport.publish([Message("m1", "OrderPlaced", b"{}")])

    # then billing's group kept it for billing (a group declared later would not see it)
    member = await transport.subscribe("billing", ["OrderPlaced"])
    (delivery,) = await member.receive(10, 1.0)
    assert delivery.message.id == "m1"
    await member.close()


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda: External("billing"), "consumes and emits nothing"),
        (lambda: External("bad name!", consumes=[OrderPlaced]), "bad name"),
        (lambda: External("b", consumes=[dict]), "is not an Event subclass"),
        (
            lambda: App(
                "x", [Service("billing")], external=[External("billing", emits=[OrderPlaced])]
            ),
            "two participants are named 'billing'",
        ),
    ],
)
def test_bad_external_declarations_fail_at_once(make: Any, says: str) -> None:
    with pytest.raises((ConfigurationError, ValueError), match=says):
        make()


def test_lint_warns_of_a_version_no_upcaster_reads() -> None:
    class Placed(Event, version=2):
        event_type: ClassVar[str] = "OrderPlaced"
        order_id: str

    shop = Service("shop", emits=[Placed])
    billing = External("billing", consumes=[Placed])
    findings = lint(App("v", [shop], external=[billing]))
    (missing,) = [f for f in findings if f.code == "missing-upcaster"]
    assert missing.subject == "OrderPlaced" and "no upcaster from version 1" in missing.message


async def test_the_console_overview_lists_the_external_participant_with_its_bus_figures(
    tmp_path: Path,
) -> None:
    # given billing's group declared on a bus, one order waiting for it and one dead-lettered
    bus = f"sqlite:///{tmp_path}/bus.db"
    async with transport_from_url(bus) as transport:
        await declare_groups(transport, app)
        await transport.publish(
            [Message("m1", "OrderPlaced", b"{}"), Message("m2", "OrderPlaced", b"{}")]
        )
        member = await transport.subscribe("billing", ["OrderPlaced"])
        (first, *_) = await member.receive(1, 1.0)
        await member.dead_letter(first, Failure("schema violation", "Invalid", "no amount"))
        await member.close()
    # and the recorder has seen the order (no report from billing: the app does not run it)
    db_url = f"sqlite:///{tmp_path}/flows.db"
    recorder = Recorder(app, "memory://", db_url)
    await recorder.db.open()
    order = new_envelope("OrderPlaced", {"order_id": "o1", "amount": 1.0}, source="shop")
    assert await recorder.record([Delivery(Message(order.id, order.type, encode(order)), 1)]) == []
    await recorder.db.close()
    settings = ConsoleSettings(db_url=db_url, app_spec="tests.contracts.test_external:app",
                               transport_url=bus)  # fmt: skip
    console = create_console_app(settings)

    # when the operator opens the overview
    async with console.router.lifespan_context(console):
        transport_ = httpx.ASGITransport(app=console)
        async with httpx.AsyncClient(transport=transport_, base_url="http://127.0.0.1") as client:
            page = (await client.get("/")).text

    # then billing is a row, marked external, with its dead letter and its waiting order
    row = page[page.index('<span class="svc">billing</span>') :].split("</tr>")[0]
    assert "(external)" in row and "not run by this app" in row, row
    cells = row.split("<td>")
    assert '<a href="/dead-letters?group=billing"><span class="bad">1</span></a>' in row  # dead
    assert cells[7].startswith("1<"), row  # the group's lag: the order still waiting for it
