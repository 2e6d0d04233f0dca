"""The one table a chaos run prints, and its verdict."""

from __future__ import annotations

import statistics

from rich.console import Console
from rich.table import Table

from chaos.run import ChaosResult, recovery_times


def _seconds(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not values:
        return "no kill"
    if not known:
        return f"n/a ({len(values)} kills, rate before too low to tell)"
    unknown = len(values) - len(known)
    text = f"median {statistics.median(known):.1f} s, max {max(known):.1f} s"
    return text + (f" ({unknown} not measurable)" if unknown else "")


def failures(result: ChaosResult) -> list[str]:
    """Why the run failed (empty: it passed)."""
    found = []
    if result.lost:
        found.append(f"{result.lost} accepted deliveries never ended")
    if result.ledger.applied_twice:
        found.append(f"{result.ledger.applied_twice} effects applied twice")
    if result.held:
        found.append(f"{result.held} resources held after their delivery ended")
    if result.stalled:
        found.append(f"stall: {result.stalled}")
    if result.poison_unaccounted:
        found.append(f"{len(result.poison_unaccounted)} poison messages not dead-lettered")
    if result.crashes:
        found.append(f"{result.crashes} processes crashed or did not stop cleanly")
    return found


def print_report(result: ChaosResult, console: Console) -> None:
    cfg = result.config
    snap = result.snapshot
    elapsed = result.ended - result.started
    table = Table(title=f"chaos: {cfg.configuration}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    completed = sum(1 for s in result.statuses.values() if s == "completed")
    table.add_row("accepted", f"{len(result.accepted)} of {result.submitted} submitted")
    refused = ", ".join(f"{k} {v}" for k, v in sorted(result.refused.items()))
    table.add_row("  POSTs sent again", refused or "0")
    table.add_row("terminal", f"{result.terminal} ({completed} completed, "
                  f"{result.terminal - completed} failed and compensated)")  # fmt: skip
    for reason, count in snap.failure_reasons.most_common(3):
        table.add_row(f"  failed: {reason}", str(count))
    table.add_row("lost", str(result.lost))
    for delivery_id in sorted(result.accepted - set(result.statuses))[:3]:
        table.add_row("  never seen by ingestion", delivery_id)
    for delivery_id, status in sorted(result.statuses.items()):
        if status not in ("completed", "failed") and result.lost <= 20:
            table.add_row(f"  still {status}", delivery_id)
    table.add_row("applied twice", str(result.ledger.applied_twice))
    table.add_row("held", f"{snap.drones_reserved} drones reserved, "
                  f"{snap.packages_unreleased} packages held")  # fmt: skip
    total_dead = sum(result.dead_letters.values())
    table.add_row("dead letters", str(total_dead))
    for reason, count in sorted(result.dead_letters.items()):
        table.add_row(f"  {reason}", str(count))
    for where, count in result.other_dead.most_common(4):
        table.add_row("  not poison", f"{count} {where}")
    turned_away = sum(1 for p in result.poison if p.refused)
    dead = len(result.poison) - turned_away - len(result.poison_unaccounted)
    table.add_row("poison messages", f"{len(result.poison)} published: {dead} dead-lettered by "
                  f"every group, {turned_away} refused at publish")  # fmt: skip
    for item in result.poison_unaccounted[:5]:
        table.add_row("  not dead-lettered", f"{item.kind} ({item.event_id})")
    members = [k for k in result.kills if k.kind == "member"]
    nodes = [k for k in result.kills if k.kind == "node"]
    table.add_row("kills", f"{len(members)} service processes, {len(nodes)} cluster nodes")
    exits = ", ".join(f"{name} ({code})" for name, code in result.unexpected_exits)
    stops = ", ".join(f"{name} ({code})" for name, code in result.unclean_stops)
    table.add_row("crashes", str(result.crashes))
    if exits:
        table.add_row("  exited by themselves", exits)
    if stops:
        table.add_row("  did not stop cleanly", stops)
    for name, why in result.failed_starts[:5]:
        table.add_row(f"  failed to start: {name}", why)
    traces = sum(result.tracebacks.values())
    where = ", ".join(f"{k} {v}" for k, v in sorted(result.tracebacks.items()))
    table.add_row("  tracebacks logged", f"{traces}" + (f" ({where})" if traces else ""))
    times = recovery_times(result)
    member_times = [t for t, k in zip(times, result.kills, strict=True) if k.kind == "member"]
    node_times = [t for t, k in zip(times, result.kills, strict=True) if k.kind == "node"]
    table.add_row("recovery (service kill)", _seconds(member_times))
    if nodes or cfg.configuration == "nats":
        table.add_row("recovery (node kill)", _seconds(node_times))
    table.add_row("handlings", f"{result.ledger.handled} ("
                  + ", ".join(f"{k} {v}" for k, v in sorted(result.ledger.outcomes.items()))
                  + ")")  # fmt: skip
    rate = result.terminal / elapsed if elapsed > 0 else 0.0
    table.add_row("elapsed", f"{elapsed:.0f} s ({rate:.0f} deliveries/s)")
    console.print(table)
    problems = failures(result)
    if problems:
        console.print("[red]FAILED:[/] " + "; ".join(problems))
        for line in (result.ledger.twice + result.ledger.two_outcomes)[:10]:
            console.print(f"  applied twice: {line}")
    else:
        console.print("[green]passed: nothing lost, nothing applied twice, nothing held, "
                      "no stall, no crash[/]")  # fmt: skip
