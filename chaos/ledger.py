"""What the services applied, read from the journals their processes wrote
(``tests.support.procs:journal``): an effect applied twice is a handling that committed (outcome
``done``) twice for one event in one service, or a delivery whose customer was told twice (two
different terminal events applied by notification)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.procs import read_journal

TERMINAL_EVENTS = ("DeliveryCompleted", "DeliveryFailed")


@dataclass
class Ledger:
    handled: int = 0
    """Handlings that ended (any outcome)."""
    outcomes: Counter[str] = field(default_factory=Counter)
    twice: list[str] = field(default_factory=list)
    """``service event-id type``: committed more than once (a timer's expiry counts apart from
    the handling of the event that set it)."""
    two_outcomes: list[str] = field(default_factory=list)
    """Deliveries for which notification applied more than one terminal event."""

    @property
    def applied_twice(self) -> int:
        return len(self.twice) + len(self.two_outcomes)


def read_ledger(journals: Iterable[Path]) -> Ledger:
    ledger = Ledger()
    done: Counter[tuple[str, str, str]] = Counter()
    told: defaultdict[str, set[str]] = defaultdict(set)
    for path in journals:
        for entry in read_journal(path):
            if entry.kind != "end":
                continue
            ledger.handled += 1
            ledger.outcomes[entry.outcome] += 1
            if entry.outcome != "done":
                continue
            done[entry.service, entry.event_id, entry.event_type] += 1
            if entry.service == "notification" and entry.event_type in TERMINAL_EVENTS:
                told[entry.correlation_id].add(entry.event_id)
    ledger.twice = sorted(f"{s} {e} {t}" for (s, e, t), n in done.items() if n > 1)
    ledger.two_outcomes = sorted(d for d, events in told.items() if len(events) > 1)
    return ledger
