"""Hypothesis strategies for what a foreign producer may put on the bus: raw bytes, and
CloudEvents-like JSON documents with arbitrary ids, attributes, extensions, nesting, sizes and
text encodings."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from choreograph.envelope import MAX_EVENT_BYTES, MAX_ID_CHARS

#: Topics the fuzzed app consumes (a message elsewhere reaches nobody).
TOPICS = ("Order", "Paid", "choreograph.HandlerFailed")

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and infinities are not JSON: the json module writes them anyway
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)


def nested(levels: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    inner = doc
    for _ in range(levels):
        inner["deeper"] = {}
        inner = inner["deeper"]
    return doc


HOSTILE_IDS = ["", "\x00", "a\x00b", "\u202eevil", "\ud800", "x" * (MAX_ID_CHARS + 1), "\n"]
ids = st.one_of(
    st.uuids().map(str),
    st.sampled_from(HOSTILE_IDS),  # twice: the values that broke stores before weigh more
    st.text(max_size=40),  # any code point: control characters, lone surrogates, RTL marks...
    st.sampled_from(HOSTILE_IDS),
    st.integers(min_value=MAX_ID_CHARS - 2, max_value=200_000).map(lambda n: "i" * n),
    json_values,  # not a string at all
)
ATTRIBUTES = ("specversion", "id", "source", "type", "time", "datacontenttype", "subject",
              "correlationid", "causationid", "traceparent", "tracestate", "data")  # fmt: skip
order_data = st.one_of(
    st.fixed_dictionaries({"order_id": ids, "amount": st.integers() | json_values}),
    st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    json_values,  # not an object
)
paddings = st.sampled_from([1_000, 100_000, MAX_EVENT_BYTES - 600, MAX_EVENT_BYTES + 10])


def valid_data(topic: str, key: str) -> dict[str, Any]:
    if topic == "choreograph.HandlerFailed":
        return {"service": "outside", "handler": "h", "failed_event_type": "Order",
                "failed_event_id": key, "reason": "r", "error_type": "E", "attempts": 1,
                "data": {"order_id": key}}  # fmt: skip
    return {"order_id": key, "amount": 5}


def _set(name: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    def apply(value: Any) -> Any:
        def mutate(doc: dict[str, Any]) -> None:
            doc[name] = value

        return mutate

    return values.map(apply)


def _data_field(name: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    def apply(value: Any) -> Any:
        def mutate(doc: dict[str, Any]) -> None:
            if isinstance(doc.get("data"), dict):
                doc["data"][name] = value

        return mutate

    return values.map(apply)


def _drop(names: frozenset[str]) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        for name in names:
            doc.pop(name, None)

    return mutate


def _extend(extra: dict[str, Any]) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        doc.update(extra)

    return mutate


#: One change each to a valid event: most generated events are valid but for one or two things.
MUTATIONS = st.one_of(
    _set("id", ids),
    _set("correlationid", st.none() | ids),
    _set("causationid", ids),
    _set("source", json_values),
    _set("type", st.sampled_from(["Order", "Paid", "Unknown", "bad type!", ""]) | json_values),
    _set("specversion", json_values),
    _set("time", json_values),
    _set("subject", json_values),
    _set("traceparent", st.text(max_size=60) | json_values),
    _set("tracestate", st.text(max_size=600)),
    _set(
        "datacontenttype",
        st.sampled_from(
            ["text/plain", "", "application/json; charset=utf-8", "application/json;charset=latin1"]
        )
        | json_values,
    ),
    _set(
        "dataschema",
        st.sampled_from(
            [
                "urn:choreograph:Order:v1",
                "urn:choreograph:Order:v9",
                "urn:choreograph:Paid:v1",
                "urn:choreograph:Order:v0",
                "https://example.com/order.json",
            ]
        )
        | st.text(max_size=40)
        | json_values,
    ),
    _set("data", order_data),
    _data_field("order_id", ids),
    _data_field("amount", json_values),
    _data_field("nested", st.integers(min_value=1, max_value=400).map(nested)),
    _data_field("padding", paddings.map(lambda n: "p" * n)),
    _data_field("text", st.text(max_size=50)),  # NUL and friends inside data
    st.frozensets(st.sampled_from(ATTRIBUTES), min_size=1, max_size=3).map(_drop),
    st.dictionaries(st.text(max_size=12), json_values, min_size=1, max_size=3).map(_extend),
)


@st.composite
def documents(draw: st.DrawFn, topic: str = "Order") -> dict[str, Any]:
    """A valid event of ``topic`` with zero to three hostile changes."""
    key = f"fuzz-{draw(st.uuids())}"
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": str(draw(st.uuids())),
        "source": "fuzz",
        "type": topic,
        "time": "2026-01-01T00:00:00Z",
        "datacontenttype": "application/json",
        "correlationid": key,
        "data": valid_data(topic, key),
    }
    for mutate in draw(st.lists(MUTATIONS, max_size=3)):
        mutate(doc)
    return doc


ENCODINGS = ("utf-8", "ascii", "utf-16", "latin-1", "truncated")


@st.composite
def bodies(draw: st.DrawFn, topic: str = "Order") -> bytes:
    """The bytes of one message: raw bytes, or a document in some encoding."""
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        return draw(st.binary(max_size=300))
    doc = draw(documents(topic))
    encoding = draw(st.sampled_from(ENCODINGS[:1] * 6 + ENCODINGS))  # mostly UTF-8
    text = json.dumps(doc, ensure_ascii=encoding == "ascii")
    if encoding == "utf-16":
        return text.encode("utf-16", "surrogatepass")
    if encoding == "latin-1":
        return text.encode("latin-1", "replace")
    body = text.encode("utf-8", "surrogatepass")  # lone surrogates make invalid UTF-8
    if encoding == "truncated":
        return body[: draw(st.integers(min_value=0, max_value=max(0, len(body) - 1)))]
    return body


@st.composite
def poison(draw: st.DrawFn) -> tuple[str, bytes | None]:
    """``(topic, body)``; a body of None asks for a copy of a valid event already sent (a
    duplicate delivery)."""
    topic = draw(st.sampled_from(TOPICS))
    if draw(st.integers(min_value=0, max_value=7)) == 0:
        return "Order", None
    return topic, draw(bodies(topic))
