"""What the console shows and how it is exposed: one typed settings object.

The console reads the flow recorder's database, the transport's dead letters and the services'
stores (their pending timers); the app gives it the choreography's declarations. With no options,
it shows the last ``choreograph demo`` run (whose data directory names all of those).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from choreograph.errors import ConfigurationError

#: Where ``choreograph demo`` writes its data (and the file naming it for the console).
DEMO_SETTINGS = Path(".choreograph/demo/console.json")


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    db_url: str
    """The flow recorder's database."""
    app_spec: str | None = None
    """The app (``module:attribute``): its declarations draw the choreography graph."""
    transport_url: str | None = None
    """The bus, for dead letters, replays and group lag."""
    store_url: str | None = None
    """The services' store URL template (``{service}``), for their pending timers."""
    host: str = "127.0.0.1"
    port: int = 8800
    token: str | None = None
    """Required to bind anything but a loopback address; visitors sign in with it once."""
    read_only: bool = False
    """Hide and refuse replay and discard."""
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    """Signs session cookies and CSRF tokens (fresh per process unless given)."""
    stuck_after: float = 60.0
    """Seconds without a terminal event after which an open transaction counts as stuck."""
    refresh: float = 2.0
    """Seconds between live updates of a page."""

    def check_exposure(self) -> None:
        """Refuse to serve a non-loopback address without a token."""
        if not is_loopback(self.host) and not self.token:
            raise ConfigurationError(
                f"refusing to serve the console on {self.host}: anyone who can reach it could "
                "replay and discard dead letters. Give a token (--token or "
                "CHOREOGRAPH_CONSOLE_TOKEN) or bind 127.0.0.1"
            )
        if self.token is not None and len(self.token) < 12:
            raise ConfigurationError("the console token must be at least 12 characters long")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def demo_defaults(path: Path = DEMO_SETTINGS) -> dict[str, str]:
    """The app, bus, stores and recorder database of the last demo run, if there was one."""
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigurationError(f"{path} is not a JSON object")
    return {k: str(v) for k, v in doc.items() if k in ("app", "transport", "db", "store")}


def secret_from_env() -> bytes | None:
    """``CHOREOGRAPH_CONSOLE_SECRET``: keeps sessions valid across restarts and replicas."""
    raw = os.environ.get("CHOREOGRAPH_CONSOLE_SECRET")
    return raw.encode() if raw else None
