"""Choreography: the graph of services and events from the declarations, with how many times
each edge was taken in a time window."""

from __future__ import annotations

import math
import time

from choreograph.console.html import notice
from choreograph.console.queries import data_window, edge_counts, window_seconds
from choreograph.console.state import ConsoleState
from choreograph.console.svg import render_graph

LEGEND = (
    '<p class="legend"><span class="k emits"></span>emits / consumes '
    '<span class="k join"></span>join part <span class="k compensates"></span>compensation '
    '<span class="k deadline"></span>deadline or join timeout '
    '<span class="k implicit"></span>the runtime announces a failure · numbers: times taken</p>'
)


async def choreography_live(state: ConsoleState, window: str) -> str:
    if state.app is None:
        return notice("Start the console with --app module:attribute to see the choreography.")
    span = window_seconds(window)
    if math.isinf(span):
        bounds = await data_window(state.db)
        since = bounds[0] - 1 if bounds else 0.0
    else:
        since = time.time() - span
    counts = await edge_counts(state.db, since)
    return f'<div class="graph-wrap">{render_graph(state.app, counts=counts)}</div>{LEGEND}'
