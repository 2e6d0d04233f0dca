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

Logging belongs here too, as the one observer every runtime has: a handling runs with its fields
bound for :class:`choreograph.logs.HandlingFilter`; a failure that will be retried is logged at
WARNING and a give-up (dead letter) at ERROR, each with the service, handler, event type and id,
correlation id, attempt and the traceback.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from choreograph.context import Context
from choreograph.envelope import Envelope
from choreograph.errors import RetryLater
from choreograph.events import Event
from choreograph.logs import bind_handling, unbind_handling
from choreograph.middleware import Checkpoint, Middleware, Next, Outcome, RuntimeView
from choreograph.transport import Failure

log = logging.getLogger("choreograph.hooks")
failures = logging.getLogger("choreograph.handling")


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
        """Run ``react`` inside every ``around_handle``, the first middleware outermost, with the
        handling's fields bound for every record logged meanwhile."""
        token = bind_handling(functools.partial(_fields, ctx))
        try:
            if not self._around:
                return await react()
            call = react
            for mw in reversed(self._around):
                call = _bind(mw, ctx, call)
            return await call()
        finally:
            unbind_handling(token)

    def stamp(self, ctx: Context | None, envelope: Envelope) -> Envelope:
        for mw in self._stamp:
            try:
                envelope = mw.stamp(ctx, envelope)
            except Exception:
                log.exception("middleware %r failed in stamp; envelope %s sent unstamped",
                              mw, envelope.type)  # fmt: skip
        return envelope

    def outcome(self, ctx: Context, outcome: Outcome) -> None:
        if outcome.failure is not None and outcome.kind in ("retry", "dead_letter"):
            _log_failure(ctx, outcome, outcome.failure)
        for mw in self._outcome:
            try:
                mw.on_outcome(ctx, outcome)
            except Exception:  # an observer must never break handling
                log.exception("%s: middleware %r failed in on_outcome", ctx.service, mw)

    def invalid(self, service: str, body: bytes, failure: Failure) -> None:
        failures.error(
            "%s dead-lettered a message it cannot handle (%s): %s: %s",
            service, failure.reason, failure.error_type, failure.error,
            extra={"service": service, "reason": failure.reason},
        )  # fmt: skip
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


def _fields(ctx: Context) -> dict[str, Any]:
    return {
        "service": ctx.service,
        "handler": ctx.handler,
        "event_type": ctx.envelope.type,
        "event_id": ctx.event_id,
        "correlation_id": ctx.correlation_id,
        "attempt": ctx.attempt,
    }


def _log_failure(ctx: Context, outcome: Outcome, failure: Failure) -> None:
    """WARNING for a failure that will be retried, ERROR for a give-up; the traceback goes where
    every formatter shows an exception's (``exc_text``)."""
    if outcome.kind == "retry":
        # RetryLater is the handler asking for it, not a failure: INFO, without the traceback
        asked = failure.error_type == RetryLater.__name__
        level = logging.INFO if asked else logging.WARNING
    else:
        level = logging.ERROR
    if not failures.isEnabledFor(level):
        return
    what = f"{ctx.service}.{ctx.handler or '?'}"
    where = f"{ctx.envelope.type} {ctx.event_id} (correlation {ctx.correlation_id}, attempt "
    if outcome.kind == "retry":
        text = f"{what} failed on {where}{ctx.attempt}); retrying in {outcome.delay:.2f}s"
    else:
        text = f"{what} gave up on {where}{ctx.attempt}): {failure.reason}, dead-lettered"
    extra = {**_fields(ctx), "reason": failure.reason, "error_type": failure.error_type}
    record = failures.makeRecord(
        failures.name, level, __file__, 0, "%s: %s: %s", (text, failure.error_type, failure.error),
        None, extra=extra,
    )  # fmt: skip
    record.exc_text = (failure.traceback or None) if level > logging.INFO else None
    failures.handle(record)
