"""Wake-ups across processes for the sqlite bus: a doorbell per bus file.

A process that receives from the bus listens on a Unix datagram socket in the abstract namespace
(no file, nothing to clean up when the process dies) and leaves an empty marker file named after
it in the directory ``<bus file>.wake``. A process that publishes sends one empty datagram, without
waiting, to every socket listed there after its commit; the listener then checks the bus at once
instead of at its next poll. Polling stays as it was, so a lost or refused ring costs latency,
never a message. A marker whose socket nobody listens on any more (its process died) is removed by
the first ring that finds it so; the last listener to close removes the directory.

Abstract sockets are Linux's; elsewhere the doorbell stays silent and the bus polls alone. Any
local process may ring (a wake-up carries nothing: the woken member only looks at the bus).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("choreograph.transports.sqlite")

_PREFIX = b"\0choreograph-wake-"
_LIST_AGAIN = 1.0


class Doorbell:
    """Rings the listeners of one bus file; listens for rings when asked to."""

    def __init__(self, bus_path: str) -> None:
        self._dir = Path(f"{bus_path}.wake")
        self._enabled = sys.platform.startswith("linux")
        self._sender: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._name = ""
        self._peers: list[str] = []
        self._listed_at = -1
        self._list_again = 0.0

    def ring(self) -> None:
        """Wake every other process listening on this bus (never blocks, never raises)."""
        if not self._enabled:
            return
        try:
            peers = self._listed()
            if not peers:
                return
            if self._sender is None:
                self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sender.setblocking(False)
            for peer in peers:
                if peer == self._name:
                    continue
                try:
                    self._sender.sendto(b"", _PREFIX + peer.encode())
                except (ConnectionRefusedError, FileNotFoundError):
                    with contextlib.suppress(OSError):  # its process is gone
                        (self._dir / peer).unlink()
                except (BlockingIOError, InterruptedError):
                    pass  # its queue is full of rings already
        except OSError as exc:
            log.debug("ringing the listeners of %s failed: %s", self._dir, exc)

    def _listed(self) -> list[str]:
        """The listeners, listed again when the directory changed (and every second: two
        changes within one tick of the file system's clock leave its time as it was)."""
        try:
            changed = self._dir.stat().st_mtime_ns
        except FileNotFoundError:
            return []
        now = time.monotonic()
        if changed != self._listed_at or now >= self._list_again:
            self._listed_at, self._list_again = changed, now + _LIST_AGAIN
            self._peers = os.listdir(self._dir)
        return self._peers

    def listen(self, on_ring: Callable[[], None]) -> None:
        """Call ``on_ring`` on the event loop whenever another process rings (idempotent)."""
        if not self._enabled or self._listener is not None:
            return
        name = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            listener.bind(_PREFIX + name.encode())
            listener.setblocking(False)
            self._mark(name)
        except OSError as exc:
            listener.close()
            log.debug("no doorbell on %s (the bus polls alone): %s", self._dir, exc)
            return

        def drain() -> None:
            with contextlib.suppress(OSError):
                while listener.recv(16) is not None:
                    pass
            on_ring()

        asyncio.get_running_loop().add_reader(listener.fileno(), drain)
        self._listener, self._name = listener, name

    def _mark(self, name: str) -> None:
        """Leave this listener's marker, making the directory if need be (again if a listener
        closing meanwhile removed it, empty)."""
        for attempt in range(3):
            self._dir.mkdir(mode=0o700, exist_ok=True)
            try:
                (self._dir / name).touch()
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(listener.fileno())
            listener.close()
            with contextlib.suppress(OSError):
                (self._dir / self._name).unlink()
            with contextlib.suppress(OSError):  # the last listener leaves no directory behind
                self._dir.rmdir()
        if self._sender is not None:
            self._sender.close()
            self._sender = None
