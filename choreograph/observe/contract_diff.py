"""Compare two versions of a choreography's contract (two AsyncAPI documents written by
``choreograph asyncapi``, or an app against a saved one): which changes break a running system,
which are safe.

Breaking, because some event in a queue, in the dead letters, from a replica not yet upgraded
or to one could no longer be handled:

- a field consumers required is removed or renamed (old consumers refuse new events);
- a field is new and required, or required where it was optional, or its type or values are
  narrowed, and no upcaster reads the older version (new consumers refuse old events);
- a version goes down, or up with no upcaster from the older version;
- an event still emitted that nobody consumes any more, a consumer whose producer disappeared, an
  event an external participant took part in removed.

Safe: new optional fields, fields no longer required, widened types and new enum values (say so:
consumers still on the old version refuse the new values, so upgrade them first), new event types,
new producers and consumers, changes read through upcasters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["breaking", "safe"]
_MAX_DEPTH = 12


@dataclass(frozen=True, slots=True)
class Change:
    severity: Severity
    event: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "event": self.event, "message": self.message}


@dataclass(slots=True)
class EventContract:
    """One event type as a document describes it."""

    name: str
    version: int
    upcasters: frozenset[int]
    data: dict[str, Any]
    producers: set[str] = field(default_factory=set)
    consumers: set[str] = field(default_factory=set)
    external: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Contract:
    events: dict[str, EventContract]
    schemas: dict[str, Any]


def read_contract(doc: dict[str, Any]) -> Contract:
    """The events, versions, data schemas, producers and consumers of an AsyncAPI document."""
    components = doc.get("components", {})
    schemas: dict[str, Any] = components.get("schemas", {})
    events: dict[str, EventContract] = {}
    by_key: dict[str, EventContract] = {}
    for key, message in components.get("messages", {}).items():
        data = message.get("payload", {}).get("properties", {}).get("data", {})
        event = EventContract(
            name=str(message.get("name", key)),
            version=int(message.get("x-choreograph-version", 1)),
            upcasters=frozenset(int(v) for v in message.get("x-choreograph-upcasters", [])),
            data=data,
        )
        events[event.name] = event
        by_key[key] = event
    external = {
        tag["name"]
        for tag in doc.get("info", {}).get("tags", [])
        if tag.get("x-choreograph-external")
    }
    for op in doc.get("operations", {}).values():
        who = (op.get("tags") or [{}])[0].get("name", "?")
        for ref in op.get("messages", []):
            found = by_key.get(str(ref.get("$ref", "")).rpartition("/")[2])
            if found is None:
                continue
            (found.producers if op.get("action") == "send" else found.consumers).add(who)
            if who in external:
                found.external.add(who)
    return Contract(events, schemas)


def diff_contracts(old: Contract, new: Contract) -> list[Change]:
    """Every change from ``old`` to ``new``, breaking ones first."""
    changes: list[Change] = []
    for name in sorted(old.events.keys() | new.events.keys()):
        before, after = old.events.get(name), new.events.get(name)
        if after is None:
            assert before is not None
            changes.append(_removed(before))
            continue
        if before is None:
            changes.append(Change("safe", name, f"new event type (v{after.version})"))
            continue
        changes += _participants(before, after)
        changes += _version(before, after)
        upcast = after.version > before.version and _covered(before, after)
        schema_changes = _Schemas(old.schemas, new.schemas, name, upcast)
        schema_changes.compare(before.data, after.data, "", 0)
        changes += schema_changes.found
    return sorted(changes, key=lambda c: (c.severity != "breaking", c.event))


def _removed(before: EventContract) -> Change:
    if before.external:
        return Change(
            "breaking", before.name,
            f"removed, though {', '.join(sorted(before.external))} (external) took part in it",
        )  # fmt: skip
    return Change("safe", before.name, "removed with all its producers and consumers")


def _participants(before: EventContract, after: EventContract) -> list[Change]:
    name = before.name
    found: list[Change] = []
    if before.producers and not after.producers and after.consumers:
        found.append(Change(
            "breaking", name,
            f"nobody emits it any more (was {', '.join(sorted(before.producers))}), but "
            f"{', '.join(sorted(after.consumers))} still wait(s) for it",
        ))  # fmt: skip
    if before.consumers and not after.consumers and after.producers:
        found.append(Change(
            "breaking", name,
            f"nobody consumes it any more (was {', '.join(sorted(before.consumers))}), but "
            f"{', '.join(sorted(after.producers))} still emit(s) it",
        ))  # fmt: skip
    for who in sorted(after.producers - before.producers):
        found.append(Change("safe", name, f"{who} now emits it"))
    for who in sorted(after.consumers - before.consumers):
        found.append(Change("safe", name, f"{who} now consumes it"))
    if after.consumers:
        for who in sorted(before.consumers - after.consumers):
            found.append(Change("safe", name, f"{who} no longer consumes it"))
    if after.producers:
        for who in sorted(before.producers - after.producers):
            found.append(Change("safe", name, f"{who} no longer emits it"))
    return found


def _covered(before: EventContract, after: EventContract) -> bool:
    return all(v in after.upcasters for v in range(before.version, after.version))


def _version(before: EventContract, after: EventContract) -> list[Change]:
    name = before.name
    if after.version < before.version:
        return [
            Change("breaking", name, f"version went down: v{before.version} → v{after.version}")
        ]
    if after.version == before.version:
        return []
    missing = [v for v in range(before.version, after.version) if v not in after.upcasters]
    if missing:
        return [Change(
            "breaking", name,
            f"v{before.version} → v{after.version} with no upcaster from version "
            f"{', '.join(map(str, missing))}: events of it in queues and dead letters fail",
        )]  # fmt: skip
    return [Change("safe", name, f"v{before.version} → v{after.version}, read through upcasters")]


class _Schemas:
    """Field-by-field comparison of two JSON Schemas (pydantic's, with ``$ref`` into
    ``components/schemas``)."""

    def __init__(self, old: dict[str, Any], new: dict[str, Any], event: str, upcast: bool) -> None:
        self.old, self.new, self.event, self.upcast = old, new, event, upcast
        self.found: list[Change] = []

    def note(self, severity: Severity, message: str, *, upcastable: bool = False) -> None:
        """``upcastable``: a change new consumers cannot read in older events, unless upcasters
        turn those into the new shape."""
        if upcastable:
            if self.upcast:
                severity, message = "safe", f"{message} (older events read through the upcasters)"
            else:
                message = f"{message}, and no upcaster reads older events"
        self.found.append(Change(severity, self.event, message))

    def compare(self, before: dict[str, Any], after: dict[str, Any], path: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            return
        before, after = _resolve(before, self.old), _resolve(after, self.new)
        where = f"field {path!r}" if path else "the data"
        old_types, new_types = _types(before, self.old), _types(after, self.new)
        narrowed = sorted(t for t in old_types if not _accepts(new_types, t))
        widened = sorted(t for t in new_types if not _accepts(old_types, t))
        if narrowed:
            self.note("breaking", f"{where} no longer accepts {', '.join(narrowed)}",
                      upcastable=True)  # fmt: skip
        if widened:
            self.note("safe", f"{where} now also accepts {', '.join(widened)} (consumers still "
                      "on the old version refuse such values: upgrade them first)")  # fmt: skip
        old_enum, new_enum = before.get("enum"), after.get("enum")
        if isinstance(old_enum, list) and isinstance(new_enum, list):
            gone = [v for v in old_enum if v not in new_enum]
            added = [v for v in new_enum if v not in old_enum]
            if gone:
                self.note("breaking", f"{where} no longer accepts {gone}", upcastable=True)
            if added:
                self.note("safe", f"{where} now also accepts {added} (upgrade consumers first)")
        self._objects(before, after, path, depth)
        if isinstance(before.get("items"), dict) and isinstance(after.get("items"), dict):
            self.compare(before["items"], after["items"], f"{path}[]", depth + 1)

    def _objects(
        self, before: dict[str, Any], after: dict[str, Any], path: str, depth: int
    ) -> None:
        old_props, new_props = _properties(before), _properties(after)
        if old_props is None or new_props is None:
            return
        old_required, new_required = _required(before), _required(after)
        prefix = f"{path}." if path else ""
        for name in sorted(old_props.keys() - new_props.keys()):
            if name in old_required:
                self.note("breaking", f"required field {prefix + name!r} removed or renamed "
                          "(consumers still on the old version refuse the new events)")  # fmt: skip
            else:
                self.note("safe", f"optional field {prefix + name!r} removed")
        for name in sorted(new_props.keys() - old_props.keys()):
            if name in new_required:
                self.note("breaking", f"new required field {prefix + name!r}", upcastable=True)
            else:
                self.note("safe", f"new optional field {prefix + name!r}")
        for name in sorted(old_props.keys() & new_props.keys()):
            if name in new_required and name not in old_required:
                self.note("breaking", f"field {prefix + name!r} is now required",
                          upcastable=True)  # fmt: skip
            elif name in old_required and name not in new_required:
                self.note(
                    "safe",
                    f"field {prefix + name!r} is no longer required (consumers "
                    "still on the old version refuse events without it: upgrade them first)",
                )
            self.compare(old_props[name], new_props[name], prefix + name, depth + 1)


def _resolve(schema: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    for _ in range(_MAX_DEPTH):
        if not isinstance(schema, dict):
            return {}
        ref = schema.get("$ref")
        if not isinstance(ref, str):
            return schema
        schema = schemas.get(ref.rpartition("/")[2], {})
    return {}


def _types(schema: dict[str, Any], schemas: dict[str, Any]) -> frozenset[str]:
    """The JSON types a schema accepts; ``*`` for any."""
    variants = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(variants, list):
        found: set[str] = set()
        for variant in variants:
            found |= _types(_resolve(variant, schemas), schemas)
        return frozenset(found)
    kind = schema.get("type")
    if isinstance(kind, str):
        return frozenset([kind])
    if isinstance(kind, list):
        return frozenset(str(k) for k in kind)
    if "properties" in schema:
        return frozenset(["object"])
    if "enum" in schema or "const" in schema:
        return frozenset()  # compared by value
    return frozenset(["*"])


def _accepts(types: frozenset[str], kind: str) -> bool:
    return kind in types or "*" in types or (kind == "integer" and "number" in types)


def _properties(schema: dict[str, Any]) -> dict[str, Any] | None:
    props = schema.get("properties")
    return props if isinstance(props, dict) else None


def _required(schema: dict[str, Any]) -> set[str]:
    required = schema.get("required")
    return {str(r) for r in required} if isinstance(required, list) else set()
