"""What every page of the console works with, opened once when the console starts."""

from __future__ import annotations

from dataclasses import dataclass

from choreograph.app import App
from choreograph.console.security import Signer
from choreograph.console.settings import ConsoleSettings
from choreograph.console.sources import Sources
from choreograph.observe.flowdb import FlowDb
from choreograph.observe.model import FlowModel


@dataclass(slots=True)
class ConsoleState:
    settings: ConsoleSettings
    db: FlowDb
    sources: Sources
    app: App | None
    signer: Signer
    model: FlowModel | None
