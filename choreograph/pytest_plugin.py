"""The pytest plugin of choreograph (registered through the ``pytest11`` entry point).

It gives tests one fixture, ``harness``: a factory that starts a
:class:`~choreograph.testing.Harness` on an app and stops it when the test ends, whatever the
test's outcome::

    async def test_a_ping_gets_its_pong(harness):
        h = await harness(app)                       # started; stopped after the test
        await h.publish(Ping(text="hi"), correlation_id="t1")
        assert (await h.wait_for(Pong, correlation_id="t1")).data == {"text": "HI"}

The factory takes the :class:`~choreograph.testing.Harness` arguments (``services=``,
``middleware=``, ``clock=``). The fixture is asynchronous and needs pytest-asyncio; the plugin
imports nothing of choreograph until a test asks for it, so it costs nothing to other projects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    from choreograph.app import App
    from choreograph.clock import VirtualClock
    from choreograph.middleware import Middleware
    from choreograph.testing import Harness


class HarnessFactory(Protocol):
    """The ``harness`` fixture: ``await harness(app, services=..., middleware=..., clock=...)``."""

    async def __call__(
        self,
        app: App,
        *,
        services: Iterable[str] | None = None,
        middleware: Sequence[Middleware] = (),
        clock: VirtualClock | None = None,
    ) -> Harness: ...


def _async_fixture(fn: Callable[[], AsyncIterator[HarnessFactory]]) -> Any:
    """A pytest-asyncio fixture; without pytest-asyncio, a fixture that says what to install."""
    try:
        import pytest_asyncio
    except ImportError:  # pragma: no cover - depends on the user's environment

        @pytest.fixture(name=fn.__name__)
        def needs_pytest_asyncio() -> None:
            pytest.fail(
                f"choreograph's {fn.__name__} fixture runs asynchronously: install "
                "pytest-asyncio (pip install pytest-asyncio) and make the test 'async def'",
                pytrace=False,
            )

        return needs_pytest_asyncio
    return pytest_asyncio.fixture(fn)


@_async_fixture
async def harness() -> AsyncIterator[HarnessFactory]:
    """``await harness(app, services=..., middleware=..., clock=...)``: a started
    :class:`~choreograph.testing.Harness`, stopped after the test."""
    from choreograph.testing import Harness

    started: list[Harness] = []

    async def start(
        app: App,
        *,
        services: Iterable[str] | None = None,
        middleware: Sequence[Middleware] = (),
        clock: VirtualClock | None = None,
    ) -> Harness:
        harness = Harness(app, services=services, middleware=middleware, clock=clock)
        await harness.__aenter__()
        started.append(harness)
        return harness

    try:
        yield start
    finally:
        for harness in reversed(started):
            await harness.__aexit__(None, None, None)
