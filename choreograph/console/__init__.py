"""The web console: every transaction of a choreography, live, in the browser.

``choreograph console`` serves it (Starlette + uvicorn, the ``http`` extra). It reads the flow
recorder's database, the transport's dead letters and the services' stores; its only writes are
replays and discards of dead letters (off with ``--read-only``) and their audit rows.
"""

from choreograph.console.app import create_console_app
from choreograph.console.settings import ConsoleSettings

__all__ = ["ConsoleSettings", "create_console_app"]
