"""``choreograph asyncapi``: an AsyncAPI 3.0 document the official @asyncapi/parser accepts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from choreograph.cli import main
from choreograph.observe.asyncapi import asyncapi_document
from tests.observe.shop import build_app
from tests.support.node import ASYNCAPI_VALIDATOR, node_project


@pytest.fixture(scope="session")
def validator() -> Path:
    """The validator script, its npm packages installed (by scripts/install-tools.sh)."""
    node_project(ASYNCAPI_VALIDATOR, "@asyncapi/parser")
    return ASYNCAPI_VALIDATOR / "validate.mjs"


def validate(validator: Path, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", str(validator), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_document_structure() -> None:
    doc = asyncapi_document(build_app())
    assert doc["asyncapi"] == "3.0.0" and doc["info"]["title"] == "shop"
    assert doc["channels"]["StockReserved"]["address"] == "StockReserved"
    ops = doc["operations"]
    assert ops["stock.send.StockReserved"]["action"] == "send"
    assert ops["shipping.receive.StockReserved"]["action"] == "receive"
    assert ops["shipping.receive.StockReserved"]["x-choreograph-steps"] == [
        {"name": "ship", "kind": "join"}
    ]
    assert ops["shop.send.OrderPlaced"]["x-choreograph-steps"] == [
        {"name": "outside", "kind": "outside"}
    ]
    message = doc["components"]["messages"]["OrderPlaced"]
    envelope = message["payload"]["properties"]
    assert envelope["type"]["const"] == "OrderPlaced"
    assert {"correlationid", "causationid", "traceparent", "tracestate"} <= set(envelope)
    assert envelope["data"] == {"$ref": "#/components/schemas/OrderPlaced"}
    data = doc["components"]["schemas"]["OrderPlaced"]
    assert data["properties"]["amount"]["type"] == "number"
    assert message["correlationId"]["location"] == "$message.payload#/correlationid"


def test_the_parser_accepts_the_document(validator: Path, tmp_path: Path) -> None:
    path = tmp_path / "shop.json"
    result = CliRunner().invoke(main, ["asyncapi", "tests.observe.shop:app", "-o", str(path)])
    assert result.exit_code == 0, result.output

    checked = validate(validator, path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "valid AsyncAPI 3.0.0" in checked.stdout


def test_the_parser_rejects_a_broken_document(validator: Path, tmp_path: Path) -> None:
    doc = asyncapi_document(build_app())
    doc["operations"]["stock.send.StockReserved"]["channel"] = {"$ref": "#/channels/Nowhere"}
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(doc))

    checked = validate(validator, path)
    assert checked.returncode == 1 and "INVALID" in checked.stdout
