from typing import ClassVar

import pytest

from choreograph import App, ConfigurationError, Context, Event, Parts, Service


class A(Event):
    key: str


class B(Event):
    key: str


class C(Event):
    event_type: ClassVar[str] = "custom.C"


def test_event_type_is_the_class_name_unless_declared() -> None:
    assert A.event_type == "A"
    assert C.event_type == "custom.C"


def test_an_invalid_event_type_fails_at_declaration() -> None:
    with pytest.raises(ValueError, match="invalid event type"):

        class Bad(Event):
            event_type: ClassVar[str] = "has spaces"


def test_declarations_are_inspectable_data() -> None:
    svc = Service("svc", emits=[C])

    @svc.on(A, emits=[B])
    async def on_a(event: A, ctx: Context) -> B:
        return B(key=event.key)

    @svc.compensate(C, undoes=on_a)
    async def undo(event: C, ctx: Context) -> None:
        return None

    assert svc.handlers[A].emits == (B,)
    assert svc.handlers[C].kind == "compensation"
    assert svc.handlers[C].undoes == "on_a"
    assert svc.consumes() == {A, C}
    assert svc.emits() == {B, C}


def test_mistakes_fail_when_declared() -> None:
    svc = Service("svc")

    @svc.on(A)
    async def first(event: A, ctx: Context) -> None:
        return None

    with pytest.raises(ConfigurationError, match="already has a handler"):
        svc.on(A)
    with pytest.raises(ConfigurationError, match="async def"):
        svc.on(B)(lambda e, c: None)  # type: ignore[arg-type, return-value]
    with pytest.raises(ConfigurationError, match="not an Event"):
        svc.on(int)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="undoes 'nothing'"):
        svc.compensate(B, undoes="nothing")
    with pytest.raises(ConfigurationError, match="two or more"):
        svc.join(B)
    with pytest.raises(ConfigurationError, match="not a field"):
        svc.join(B, C, key="key")
    with pytest.raises(TypeError):
        svc.on(B, retries=3)  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="invalid group"):
        Service("no spaces please")


def test_join_parts_are_claimed() -> None:
    svc = Service("svc")

    @svc.join(A, B, key="key", within=5)
    async def both(parts: Parts, ctx: Context) -> None:
        return None

    assert svc.joins["both"].within == 5
    with pytest.raises(ConfigurationError, match="already has a handler or join"):
        svc.on(A)


def test_app_rejects_duplicate_service_names_and_names_unknown_ones() -> None:
    with pytest.raises(ConfigurationError, match="two services"):
        App("x", [Service("s"), Service("s")])
    with pytest.raises(ConfigurationError, match="has no service 'nope'; its services: s"):
        App("x", [Service("s")]).service("nope")
