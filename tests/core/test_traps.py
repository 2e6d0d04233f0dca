"""No silent traps in the framework: numbers that JSON cannot carry are refused when an event is
made, and services never share one store by accident."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ConfigDict, ValidationError

from choreograph import App, ConfigurationError, Context, Event, Runtime, SchemaViolation, Service
from choreograph.store import store_from_url


class Reading(Event):
    value: float
    extra: dict[str, Any] = {}


class Lenient(Event):
    model_config = ConfigDict(allow_inf_nan=True)
    value: float


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_an_event_with_a_non_finite_number_is_refused_where_it_is_made(bad: float) -> None:
    # NaN and Infinity would travel as null and fail every consumer: refused at once
    with pytest.raises(ValidationError, match="value"):
        Reading(value=bad)
    with pytest.raises(ValidationError, match=r"extra\.samples\.1 is not a finite number"):
        Reading(value=1.0, extra={"samples": [1.0, bad]})
    with pytest.raises(SchemaViolation, match="not a finite number"):
        Reading.parse_data({"value": 1.0, "extra": {"x": bad}})


def test_a_class_may_opt_in_to_non_finite_numbers() -> None:
    assert math.isnan(Lenient(value=math.nan).value)
    assert Reading(value=1.5, extra={"n": [1, 2.5]}).to_data() == {
        "value": 1.5,
        "extra": {"n": [1, 2.5]},
    }


ping, pong = Service("ping", emits=[Reading]), Service("pong")


@pong.on(Reading)
async def read(event: Reading, ctx: Context) -> None:
    return None


app = App("readings", [ping, pong])


@pytest.mark.parametrize(
    "url",
    ["sqlite:///{tmp}/one.db", "postgresql://127.0.0.1/test?schema=shared"],
    ids=["sqlite-file", "postgres-one-schema"],
)
def test_a_store_url_shared_by_several_services_is_refused(tmp_path: Path, url: str) -> None:
    # when two services of one runtime would get one store (no {service} in the URL)
    with pytest.raises(ConfigurationError, match=r"has no \{service\}: services ping, pong"):
        Runtime(app, transport="memory://", store=url.format(tmp=tmp_path))


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///{tmp}/{{service}}.db",
        "memory://",
        "postgresql://127.0.0.1/test",
        "sqlite:///{tmp}/one.db",
    ],
    ids=["template", "memory", "postgres-schema-per-service", "one-service-alone"],
)
def test_store_urls_that_give_each_service_its_own_store_are_accepted(
    tmp_path: Path, url: str
) -> None:
    services = ["pong"] if "one.db" in url else None
    runtime = Runtime(app, transport="memory://", store=url.format(tmp=tmp_path), services=services)
    assert runtime.store_url


async def test_a_sqlite_store_file_belongs_to_the_first_service_that_opens_it(
    tmp_path: Path,
) -> None:
    # given a store file opened by one service (as a process running only `ping` would)
    url = f"sqlite:///{tmp_path}/shared.db"
    first = store_from_url(url, "ping")
    await first.open()
    await first.close()
    # when another service (another process, same literal URL) opens it
    second = store_from_url(url, "pong")
    with pytest.raises(ConfigurationError, match="belongs to service 'ping'; 'pong' cannot share"):
        await second.open()
    # then the owner still opens it
    again = store_from_url(url, "ping")
    await again.open()
    await again.close()


async def test_an_event_published_before_any_service_started_is_kept_for_them(
    tmp_path: Path,
) -> None:
    # given an app whose only consumer has never run, and a script publishing with Runtime
    seen: list[float] = []
    arrived = asyncio.Event()
    reader = Service("reader")

    @reader.on(Reading)
    async def note(event: Reading, ctx: Context) -> None:
        seen.append(event.value)
        arrived.set()

    readings = App("early", [Service("source", emits=[Reading]), reader])
    bus, stores = f"sqlite:///{tmp_path}/bus.db", f"sqlite:///{tmp_path}/{{service}}.db"
    script = Runtime(readings, transport=bus, store=stores, services=[])
    await script.publish(Reading(value=4.2), source="script")
    await script.stop()

    # when the consumer starts afterwards
    async with Runtime(readings, transport=bus, store=stores, services=["reader"]):
        await asyncio.wait_for(arrived.wait(), 30)  # a guard against hanging only

    # then the early event was kept for it
    assert seen == [4.2]
