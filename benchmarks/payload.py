"""The ~200-byte event every W1 side moves: one CloudEvents envelope of a ``Tick``.

Raw baselines send the very same bytes, so that no side gains by a smaller body. Bodies are
encoded before the clock starts, on every side: W1 measures moving messages, not building them.
"""

from __future__ import annotations

import asyncio

from choreograph import App, Context, Event, Service
from choreograph.envelope import Envelope, encode, new_id


class Tick(Event):
    seq: int


def tick_message(seq: int) -> tuple[str, bytes]:
    """A fresh event id and its encoded envelope (242 bytes)."""
    event_id = new_id()
    envelope = Envelope(
        id=event_id, type=Tick.event_type, source="bench", correlationid=event_id,
        data={"seq": seq},
    )  # fmt: skip
    return event_id, encode(envelope)


def tick_bodies(count: int) -> list[tuple[str, bytes]]:
    """``count`` (event id, encoded envelope) pairs."""
    return [tick_message(seq) for seq in range(count)]


# The W1 "runtime" side: a service whose handler does nothing but count.
class Progress:
    def __init__(self) -> None:
        self.handled = 0
        self.target = 0
        self.first = asyncio.Event()
        self.reached = asyncio.Event()


progress = Progress()
sink = Service("sink")


@sink.on(Tick)
async def absorb(event: Tick, ctx: Context) -> None:
    progress.handled += 1
    progress.first.set()
    if progress.handled >= progress.target:
        progress.reached.set()


sink_app = App("w1-sink", [sink])
