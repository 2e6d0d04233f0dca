"""What the console reads besides the recorder: the bus (dead letters, lag; replay and discard)
and the services' stores (pending timers). Each is optional; when one cannot be reached the page
says so and shows the rest."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import orjson

from choreograph.app import App
from choreograph.envelope import Envelope, decode, encode
from choreograph.errors import ChoreographError, InvalidMessage, SchemaViolation
from choreograph.events import BUILTIN_EVENTS, Event
from choreograph.store import Store, Timer, store_from_url
from choreograph.transport import DeadLetter, Transport, redact, transport_from_url

log = logging.getLogger("choreograph.console")

#: Most dead letters the console lists (and searches for one by id).
MAX_LETTERS = 5000


class Unavailable(Exception):
    """The bus or a store cannot be reached or is not configured; the message says which."""


class Rejected(ValueError):
    """An action refused before anything was sent (e.g. edited data fails the schema)."""


@dataclass(frozen=True, slots=True)
class Letter:
    """A dead letter with its envelope decoded (when it can be)."""

    letter: DeadLetter
    envelope: Envelope | None
    problem: str | None
    """Why the envelope could not be decoded."""

    @property
    def id(self) -> str:
        return self.letter.id

    @property
    def correlation_id(self) -> str:
        return self.envelope.correlationid if self.envelope else ""

    @property
    def event_type(self) -> str:
        return self.envelope.type if self.envelope else self.letter.message.topic


class Sources:
    """The bus and the stores of one app, opened on first use and kept open."""

    def __init__(self, app: App | None, transport_url: str | None, store_url: str | None) -> None:
        self.app = app
        self.transport_url = transport_url
        self.store_url = store_url
        self._transport: Transport | None = None
        self._stores: dict[str, Store] = {}
        self.classes: dict[str, type[Event]] = {cls.event_type: cls for cls in BUILTIN_EVENTS}
        if app is not None:
            self.classes.update(app.event_types())

    @property
    def bus_label(self) -> str:
        """The bus URL without credentials (safe to show)."""
        return redact(self.transport_url) if self.transport_url else "no bus configured"

    async def transport(self) -> Transport:
        if self.transport_url is None:
            raise Unavailable("no bus configured (--transport): dead letters are not shown")
        if self._transport is None:
            transport = transport_from_url(self.transport_url)
            try:
                await transport.connect()
            except (ChoreographError, OSError) as exc:
                raise Unavailable(f"cannot reach the bus {self.bus_label}: {exc}") from None
            self._transport = transport
        return self._transport

    async def close(self) -> None:
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.close()
            self._transport = None
        for store in self._stores.values():
            with contextlib.suppress(Exception):
                await store.close()
        self._stores.clear()

    # dead letters --------------------------------------------------------------------------------

    async def letters(self, group: str | None = None) -> list[Letter]:
        transport = await self.transport()
        try:
            found = await transport.dead_letters(group or None, limit=MAX_LETTERS)
        except (ChoreographError, OSError) as exc:
            raise Unavailable(f"cannot list dead letters on {self.bus_label}: {exc}") from None
        return [_decoded(letter) for letter in found]

    async def letter(self, letter_id: str) -> Letter | None:
        for letter in await self.letters():
            if letter.id == letter_id:
                return letter
        return None

    async def lag(self, group: str) -> int | None:
        with contextlib.suppress(Unavailable, ChoreographError, OSError):
            return await (await self.transport()).lag(group)
        return None

    def edited_body(self, letter: Letter, data_text: str) -> bytes:
        """The letter's envelope with ``data_text`` as its data, checked against the event's
        schema; :class:`Rejected` saying why it cannot be sent."""
        if letter.envelope is None:
            raise Rejected("this envelope cannot be decoded; it can only be replayed as is")
        try:
            data = orjson.loads(data_text)
        except orjson.JSONDecodeError as exc:
            raise Rejected(f"the data is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise Rejected("the data must be a JSON object")
        cls = self.classes.get(letter.envelope.type)
        if cls is None:
            raise Rejected(f"no schema is known for {letter.envelope.type}; pass --app")
        try:
            cls.parse_data(data)
        except SchemaViolation as exc:
            raise Rejected(str(exc)) from None
        try:
            return encode(letter.envelope.evolve(data=data))
        except InvalidMessage as exc:
            raise Rejected(str(exc)) from None

    async def replay(self, letter_id: str, body: bytes | None) -> bool:
        transport = await self.transport()
        try:
            return await transport.replay(letter_id, body)
        except (ChoreographError, OSError) as exc:
            raise Rejected(f"the bus refused the replay: {exc}") from None

    async def discard(self, letter_id: str) -> bool:
        transport = await self.transport()
        try:
            return await transport.discard(letter_id)
        except (ChoreographError, OSError) as exc:
            raise Rejected(f"the bus refused the discard: {exc}") from None

    # timers --------------------------------------------------------------------------------------

    async def pending_timers(self, key: str) -> list[tuple[str, Timer]]:
        """Timers of ``key`` still pending in each service's store: ``(service, timer)``."""
        if self.store_url is None or self.app is None:
            raise Unavailable("no stores configured (--store): pending timers are not shown")
        found: list[tuple[str, Timer]] = []
        for service in self.app.services.values():
            if not service.has_timers():
                continue
            try:
                store = await self._store(service.name)
                found += [(service.name, t) for t in await store.list_timers(key, limit=50)]
            except (ChoreographError, OSError) as exc:
                raise Unavailable(f"cannot read the timers of {service.name}: {exc}") from None
        return found

    async def _store(self, service: str) -> Store:
        assert self.store_url is not None
        if service not in self._stores:
            store = store_from_url(self.store_url, service)
            await store.open()
            self._stores[service] = store
        return self._stores[service]


def _decoded(letter: DeadLetter) -> Letter:
    try:
        return Letter(letter, decode(letter.message.body, limit=1 << 26), None)
    except InvalidMessage as exc:
        return Letter(letter, None, str(exc))


def pretty(data: Any) -> str:
    """JSON for a page (indented; never fails)."""
    try:
        return orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):
        return repr(data)[:20_000]
