"""Static checks of a choreography, from its declarations alone.

Errors are flows that cannot work (a handler waiting for an event nobody publishes, a failure
nobody answers, a join that can wait forever); warnings are flows that may be intended but are
often mistakes (an event nobody consumes, a failure nobody compensates, a cycle).

Events published from outside handlers (an HTTP API's ``DeliveryRequested``) must be declared on
their service: ``Service("ingestion", emits=[DeliveryRequested])``; otherwise they look
unpublished.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from choreograph.app import App
from choreograph.events import CompensationFailed, DeadlineExpired, HandlerFailed, JoinTimedOut
from choreograph.observe.model import FlowModel, Step, is_failure_type

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    code: str
    message: str
    subject: str = ""
    """The event type, service or step concerned."""

    def as_dict(self) -> dict[str, str]:
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "subject": self.subject,
        }


def lint(app: App) -> list[Finding]:
    """Every finding for ``app``, errors first."""
    model = FlowModel(app)
    findings: list[Finding] = []
    consumed, emitted = model.consumed(), model.emitted()
    implicit = {HandlerFailed.event_type, CompensationFailed.event_type}
    has_handlers = any(s.kind in ("handler", "join") for s in model.steps)
    consumers = {t: [s for s in model.steps if t in s.triggers] for t in consumed}

    if not app.terminal:
        findings.append(
            Finding(
                "warning",
                "no-terminal",
                "the app declares no terminal events: nothing marks a transaction as ended, so "
                "timers are never dropped and the recorder counts every transaction as in flight",
                app.name,
            )
        )
    for name in sorted(consumed - emitted - implicit):
        who = ", ".join(sorted({s.label for s in consumers.get(name, [])})) or "a deadline"
        if name == DeadlineExpired.event_type:
            continue
        findings.append(
            Finding(
                "error",
                "never-emitted",
                f"{name} is consumed ({who}) but no service emits it; if it comes from outside "
                f"handlers (an HTTP API, a script), declare it: Service(..., emits=[{name}])",
                name,
            )
        )
    for name in sorted(emitted - consumed):
        if name in model.terminal:
            continue
        severity: Severity = "error" if is_failure_type(name) and app.terminal else "warning"
        findings.append(
            Finding(
                severity,
                "never-consumed",
                f"{name} is emitted ({_who(model.emitters(name))}) but no service consumes it"
                + (
                    "; a failure nobody reacts to leaves the transaction hanging"
                    if severity == "error"
                    else ""
                ),
                name,
            )
        )
    if has_handlers and HandlerFailed.event_type not in consumed:
        findings.append(
            Finding(
                "warning",
                "handler-failures-unhandled",
                "no service reacts to choreograph.HandlerFailed: when a handler gives up, the "
                "transaction waits for a deadline (if any) instead of failing at once",
                HandlerFailed.event_type,
            )
        )
    findings += _versions(model)
    findings += _compensations(app, model)
    findings += _early_compensations(app)
    findings += _joins(model)
    findings += _cycles(model)
    return sorted(findings, key=lambda f: (f.severity != "error", f.code, f.subject))


def _versions(model: FlowModel) -> list[Finding]:
    """Versioned event types that cannot read every older version (no upcaster from it)."""
    found: list[Finding] = []
    for name, cls in sorted(model.classes.items()):
        gaps = [v for v in range(1, cls.event_version) if v not in cls.event_upcasters]
        if gaps:
            found.append(
                Finding(
                    "warning",
                    "missing-upcaster",
                    f"{name} is at version {cls.event_version} but has no upcaster from version "
                    f"{', '.join(map(str, gaps))}: such events (in queues, dead letters, or from "
                    "replicas not yet upgraded) are dead-lettered as schema violations",
                    name,
                )
            )
    return found


def _who(steps: list[Step]) -> str:
    return ", ".join(sorted({s.label for s in steps})) or "nobody"


def _compensations(app: App, model: FlowModel) -> list[Finding]:
    """Failure events nobody compensates, when work done before them may need undoing."""
    found: list[Finding] = []
    compensated = {s.triggers[0] for s in model.steps if s.kind == "compensation"}
    for name in sorted(model.emitted() | model.consumed()):
        if not is_failure_type(name) or name in compensated:
            continue
        if name in (JoinTimedOut.event_type, DeadlineExpired.event_type):
            continue  # answered by a handler that announces the business failure
        handlers = [s for s in model.steps if name in s.triggers]
        # A failure that is answered by a further failure event is compensated downstream.
        escalates = any(is_failure_type(t) for s in handlers for t in s.emits)
        if escalates:
            continue
        if name == HandlerFailed.event_type and not handlers:
            continue  # reported by handler-failures-unhandled
        ends = name in model.terminal
        if ends or not handlers:
            found.append(
                Finding(
                    "warning",
                    "uncompensated-failure",
                    f"{name} ends the transaction but no service compensates it: work done before "
                    "it (reservations, charges) is never undone"
                    if ends
                    else f"{name} has no compensation and no handler",
                    name,
                )
            )
    if not compensated and any(is_failure_type(t.event_type) for t in app.terminal):
        found.append(
            Finding(
                "warning",
                "no-compensations",
                "the app can fail (a terminal failure event) but declares no compensation",
                app.name,
            )
        )
    return found


def _early_compensations(app: App) -> list[Finding]:
    """Compensations that can run before the step they undo, with nothing to undo it after.

    A step arriving after a *terminal* event does not run (late events), so a compensation on a
    terminal failure undoes the step whatever the order. On any other event, the step may still
    arrive (and run) after the compensation did.
    """
    found: list[Finding] = []
    if not app.terminal:
        return found
    for service in app.services.values():
        specs = [s for s in service.handlers.values() if s.kind == "compensation"]
        undone_at_end = {s.undoes for s in specs if s.event in app.terminal}
        for spec in specs:
            if spec.undoes in undone_at_end:
                continue
            found.append(
                Finding(
                    "warning",
                    "compensation-before-end",
                    f"{service.name}.{spec.name} undoes {spec.undoes} on {spec.event.event_type}, "
                    "which does not end the transaction: if it arrives first, the step still runs "
                    "afterwards and nothing undoes it; compensate on a terminal failure too (a "
                    "step arriving after the end does not run)",
                    f"{service.name}.{spec.name}",
                )
            )
    return found


def _joins(model: FlowModel) -> list[Finding]:
    found: list[Finding] = []
    for join in model.services_of("join"):
        if join.within is not None:
            continue
        guarded = [
            d
            for d in model.services_of("deadline")
            if set(d.expect) & (set(join.emits) | set(join.triggers))
        ]
        if guarded:
            continue
        found.append(
            Finding(
                "error",
                "join-without-deadline",
                f"join {join.label} has no 'within' and no deadline covers it: if a part never "
                "arrives the transaction waits forever; give it within=... (and on_timeout=...)",
                join.label,
            )
        )
    timed_out = {
        s.label for s in model.services_of("join_timeout") if JoinTimedOut.event_type in s.emits
    }
    if timed_out and JoinTimedOut.event_type not in model.consumed():
        found.append(
            Finding(
                "error",
                "join-timeout-unhandled",
                f"joins {', '.join(sorted(timed_out))} publish choreograph.JoinTimedOut on "
                "timeout but no service consumes it (add on_timeout=... or a handler)",
                JoinTimedOut.event_type,
            )
        )
    return found


def _cycles(model: FlowModel) -> list[Finding]:
    """Cycles in event → step → event, through declared emissions only."""
    edges: dict[str, set[str]] = {}
    for step in model.steps:
        for trigger in step.triggers:
            edges.setdefault(trigger, set()).update(step.emits)
    found: list[Finding] = []
    seen_cycles: set[frozenset[str]] = set()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                key = frozenset(cycle)
                if key not in seen_cycles:
                    seen_cycles.add(key)
                    found.append(
                        Finding(
                            "warning",
                            "cycle",
                            f"events can cause each other in a cycle: {' → '.join(cycle)}; "
                            "make sure it always terminates",
                            cycle[0],
                        )
                    )
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found
