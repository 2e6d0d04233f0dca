"""The one object through which the runtime calls middleware, and the rules it calls them by.

Handling, the worker and the runner call :class:`Hooks` only, never a middleware directly, so the
guarding rules live here and nowhere else:

====================  =========================================================================
hook                  when a middleware raises
====================  =========================================================================
``start``             propagates: a middleware that cannot start stops the runtime's start
``around_handle``     propagates: it runs inside the message's savepoint, so it counts as the
                      handler's failure (retried, then dead-lettered and announced)
``stamp``             guarded: logged, the envelope goes out without that middleware's stamp
``on_outcome``        guarded: logged, the outcome stands (the transaction has committed)
``on_invalid``        guarded: logged, the message is dead-lettered all the same
``checkpoint``        guarded: logged, the batch goes on
``stop``              guarded: logged, the other middleware still stop
====================  =========================================================================

Only the middleware that override a hook are called for it, so an empty chain (or a chain that
does not use a hook) costs nothing per message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from choreograph.context import Context
from choreograph.envelope import Envelope
from choreograph.events import Event
from choreograph.middleware import Checkpoint, Middleware, Next, Outcome, RuntimeView
from choreograph.transport import Failure

log = logging.getLogger("choreograph.hooks")


def _overriding(middleware: Sequence[Middleware], hook: str) -> tuple[Middleware, ...]:
    base = getattr(Middleware, hook)
    return tuple(mw for mw in middleware if getattr(type(mw), hook, base) is not base)


class Hooks:
    """The middleware of one runtime, in order (the first is outermost around a handling)."""

    __slots__ = ("_around", "_checkpoint", "_invalid", "_outcome", "_stamp", "middleware")

    def __init__(self, middleware: Sequence[Middleware] = ()) -> None:
        self.middleware: tuple[Middleware, ...] = tuple(middleware)
        self._around = _overriding(self.middleware, "around_handle")
        self._stamp = _overriding(self.middleware, "stamp")
        self._outcome = _overriding(self.middleware, "on_outcome")
        self._invalid = _overriding(self.middleware, "on_invalid")
        self._checkpoint = _overriding(self.middleware, "checkpoint")

    def __bool__(self) -> bool:
        return bool(self.middleware)

    async def start(self, runtime: RuntimeView) -> None:
        for mw in self.middleware:
            await mw.start(runtime)

    async def stop(self) -> None:
        for mw in reversed(self.middleware):
            try:
                await mw.stop()
            except Exception:
                log.exception("middleware %r failed to stop", mw)

    async def handle(self, ctx: Context, react: Next) -> list[Event]:
        """Run ``react`` inside every ``around_handle``, the first middleware outermost."""
        if not self._around:
            return await react()
        call = react
        for mw in reversed(self._around):
            call = _bind(mw, ctx, call)
        return await call()

    def stamp(self, ctx: Context | None, envelope: Envelope) -> Envelope:
        for mw in self._stamp:
            try:
                envelope = mw.stamp(ctx, envelope)
            except Exception:
                log.exception("middleware %r failed in stamp; envelope %s sent unstamped",
                              mw, envelope.type)  # fmt: skip
        return envelope

    def outcome(self, ctx: Context, outcome: Outcome) -> None:
        for mw in self._outcome:
            try:
                mw.on_outcome(ctx, outcome)
            except Exception:  # an observer must never break handling
                log.exception("%s: middleware %r failed in on_outcome", ctx.service, mw)

    def invalid(self, service: str, body: bytes, failure: Failure) -> None:
        for mw in self._invalid:
            try:
                mw.on_invalid(service, body, failure)
            except Exception:
                log.exception("%s: middleware %r failed in on_invalid", service, mw)

    def checkpoint(self, service: str, point: Checkpoint) -> None:
        for mw in self._checkpoint:
            try:
                mw.checkpoint(service, point)
            except Exception:
                log.exception("%s: middleware %r failed at checkpoint %s", service, mw, point)


def _bind(mw: Middleware, ctx: Context, call_next: Next) -> Next:
    async def call() -> list[Event]:
        return await mw.around_handle(ctx, call_next)

    return call
