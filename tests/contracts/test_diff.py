"""``choreograph diff OLD NEW``: a series of deliberate changes to a contract, each flagged as
breaking (exit 1) or passed as safe (exit 0), comparing two saved AsyncAPI documents, or an app
against a saved document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, create_model

from choreograph import App, Context, Event, Service, upcaster
from choreograph.cli import main
from choreograph.observe.asyncapi import asyncapi_document


class Location(BaseModel):
    latitude: float
    longitude: float


class NarrowLocation(BaseModel):
    latitude: int
    longitude: float


BASE: dict[str, Any] = {
    "delivery_id": (str, ...),
    "weight_kg": (float, ...),
    "size": (Literal["S", "M", "L"], ...),
    "pickup": (Location, ...),
    "note": (str | None, None),
}


def contract(
    fields: dict[str, Any] | None = None,
    *,
    version: int = 1,
    upcast: bool = False,
    notification: bool = True,
    package_emits: bool = True,
    audit: bool = False,
) -> App:
    """The delivery contract, changed as asked."""
    requested = create_model(  # type: ignore[call-overload]
        "DeliveryRequested", __base__=Event, __cls_kwargs__={"version": version},
        **(BASE if fields is None else fields),
    )  # fmt: skip
    if upcast:
        upcaster(requested, from_version=1)(lambda data: data)

    class PackageReady(Event):
        delivery_id: str

    class DeliveryCompleted(Event):
        delivery_id: str

    class DeliveryAudited(Event):
        delivery_id: str

    ingestion = Service("ingestion", emits=[requested])
    package, delivery = Service("package"), Service("delivery")
    services = [ingestion, package, delivery]

    @package.on(requested, emits=[PackageReady] if package_emits else [])
    async def prepare(event: Any, ctx: Context) -> None:
        return None

    @delivery.on(PackageReady, emits=[DeliveryCompleted, *([DeliveryAudited] if audit else [])])
    async def fly(event: PackageReady, ctx: Context) -> None:
        return None

    if notification:
        notify = Service("notification")

        @notify.on(DeliveryCompleted)
        async def tell(event: DeliveryCompleted, ctx: Context) -> None:
            return None

        services.append(notify)
    if audit:
        auditor = Service("auditor")

        @auditor.on(DeliveryAudited)
        async def keep(event: DeliveryAudited, ctx: Context) -> None:
            return None

        services.append(auditor)
    return App("drone", services, terminal=[DeliveryCompleted])


def changed(**replace: Any) -> dict[str, Any]:
    fields = {**BASE, **replace}
    return {k: v for k, v in fields.items() if v is not None}


SERIES: list[tuple[str, App, str, str]] = [
    # (what, new contract, severity expected, words of its message)
    ("new optional field", contract(changed(insured=(bool, False))), "safe",
     "new optional field 'insured'"),
    ("new required field", contract(changed(priority=(str, ...))), "breaking",
     "new required field 'priority', and no upcaster reads older events"),
    ("new required field with an upcaster", contract(changed(priority=(str, ...)), version=2,
     upcast=True), "safe", "new required field 'priority' (older events read through the "
     "upcasters)"),
    ("version up without upcaster", contract(version=2), "breaking", "no upcaster from version 1"),
    ("required field removed", contract(changed(weight_kg=None)), "breaking",
     "required field 'weight_kg' removed or renamed"),
    ("field renamed", contract(changed(weight_kg=None, weight_g=(float, ...))), "breaking",
     "required field 'weight_kg' removed or renamed"),
    ("type narrowed", contract(changed(weight_kg=(int, ...))), "breaking",
     "field 'weight_kg' no longer accepts number"),
    ("nested type narrowed", contract(changed(pickup=(NarrowLocation, ...))), "breaking",
     "field 'pickup.latitude' no longer accepts number"),
    ("enum narrowed", contract(changed(size=(Literal["S", "M"], ...))), "breaking",
     "field 'size' no longer accepts ['L']"),
    ("optional made required", contract(changed(note=(str, ...))), "breaking",
     "field 'note' is now required"),
    ("nobody consumes an event any more", contract(notification=False), "breaking",
     "nobody consumes it any more (was notification)"),
    ("a consumer's producer disappeared", contract(package_emits=False), "breaking",
     "nobody emits it any more (was package), but delivery still wait(s) for it"),
    ("type widened", contract(changed(weight_kg=(float | str, ...))), "safe",
     "field 'weight_kg' now also accepts string"),
    ("enum widened", contract(changed(size=(Literal["S", "M", "L", "XL"], ...))), "safe",
     "field 'size' now also accepts ['XL']"),
    ("optional field removed", contract(changed(note=None)), "safe",
     "optional field 'note' removed"),
    ("required made optional", contract(changed(weight_kg=(float, 1.0))), "safe",
     "field 'weight_kg' is no longer required"),
    ("new event with its consumer", contract(audit=True), "safe", "new event type (v1)"),
]  # fmt: skip


def save(app: App, path: Path) -> Path:
    path.write_text(json.dumps(asyncapi_document(app)))
    return path


def diff(old: str, new: str, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["diff", old, new, *extra])
    return result.exit_code, result.output


@pytest.mark.parametrize(("what", "new", "severity", "says"), SERIES, ids=[s[0] for s in SERIES])
def test_each_deliberate_change_is_flagged_or_passed(
    what: str, new: App, severity: str, says: str, tmp_path: Path
) -> None:
    old = save(contract(), tmp_path / "old.json")
    code, _ = diff(str(old), str(save(new, tmp_path / "new.json")), "--json")
    changes = json.loads(_)
    found = [c for c in changes if says in c["message"]]
    assert found, (what, changes)
    assert {c["severity"] for c in found} == {severity}, (what, changes)
    breaking = [c for c in changes if c["severity"] == "breaking"]
    if severity == "safe":
        assert breaking == [] and code == 0, (what, changes)
    else:
        assert code == 1, (what, changes)


def test_the_same_contract_has_no_changes(tmp_path: Path) -> None:
    code, output = diff(str(save(contract(), tmp_path / "a.json")),
                        str(save(contract(), tmp_path / "b.json")))  # fmt: skip
    assert code == 0 and "0 breaking, 0 safe change(s)" in output


def test_a_version_going_down_is_breaking(tmp_path: Path) -> None:
    old = save(contract(changed(priority=(str, ...)), version=2, upcast=True), tmp_path / "o.json")
    code, output = diff(str(old), str(save(contract(), tmp_path / "n.json")))
    assert code == 1 and "version went down: v2 → v1" in output


def test_an_app_against_its_saved_document_and_bad_input(tmp_path: Path) -> None:
    saved = tmp_path / "hello.json"
    assert (
        CliRunner().invoke(main, ["asyncapi", "examples.hello:app", "-o", str(saved)]).exit_code
        == 0
    )
    code, output = diff(str(saved), "examples.hello:app")
    assert code == 0 and "0 breaking" in output
    (tmp_path / "not.json").write_text("[1]")
    code, output = diff(str(tmp_path / "not.json"), "examples.hello:app")
    assert code == 2 and "not an AsyncAPI 3 document" in output


def test_removing_an_event_an_external_participant_took_part_in_is_breaking(
    tmp_path: Path,
) -> None:
    from tests.contracts.shop import build

    old = save(build(), tmp_path / "old.json")
    new = save(App("shop", [Service("shop")]), tmp_path / "new.json")
    code, output = diff(str(old), str(new))
    assert code == 1 and "removed, though billing (external) took part in it" in output
