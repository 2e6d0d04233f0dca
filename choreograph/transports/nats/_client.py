"""One NATS connection: its state across reconnects, confirmed publishing, JetStream API calls."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats.errors as ne
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSub
from nats.js.errors import APIError, ServiceUnavailableError

from choreograph.errors import ChoreographError, PayloadTooLarge, TransportError
from choreograph.transport import redact
from choreograph.transports.nats._errors import TRANSLATED, is_transient, translate, translated
from choreograph.transports.nats._settings import NatsSettings

log = logging.getLogger("choreograph.transports.nats")

Outgoing = tuple[str, bytes, dict[str, str] | None]
"""(subject, payload, headers) of one message to store."""

_RETRYABLE_CODES = frozenset({503})
"""Publish refusals worth resending: JetStream not ready (e.g. recovering after a restart)."""
_API_FIRST_PAUSE = 0.1
_API_MAX_PAUSE = 2.0
"""Seconds between attempts at a JetStream API request the cluster could not answer: doubling
from the first to the most."""
_CLOSE_TIMEOUT = 5.0
_HEADER_SLACK = 64 * 1024
"""Payloads shorter than max_payload by this much fit with any headers this transport writes
(ids are at most 4,096 characters, dead-letter records are cut to fit)."""
_WRITE_CHUNK = 1024 * 1024
"""Bytes of protocol handed to the client at a time on the fast path."""


_ID_LINE = b"Nats-Msg-Id: "


def _parse_id_header(general: Callable[[bytes], dict[str, str]], raw: bytes) -> dict[str, str]:
    """nats-py's header parser, with a short cut for a lone ``Nats-Msg-Id`` line."""
    if raw.startswith(_ID_LINE) and raw.find(b"\r\n") == len(raw) - 4:
        value = raw[len(_ID_LINE) : -4]
        if value.isascii() and not value[:1].isspace() and not value[-1:].isspace():
            return {"Nats-Msg-Id": value.decode()}
    return general(raw)


def encode_headers(headers: dict[str, str]) -> bytes:
    """A ``NATS/1.0`` header block. Values are built by this transport: ASCII, no CR or LF."""
    lines = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items())
    return b"NATS/1.0\r\n" + lines + b"\r\n"


class _Confirmations:
    """The server's answers to one attempt at publishing a batch."""

    __slots__ = ("done", "errors", "interrupted", "ok", "waiting")

    def __init__(self, size: int) -> None:
        self.ok = bytearray(size)
        self.waiting = size
        self.errors: dict[int, tuple[int, str]] = {}
        self.done = asyncio.Event()
        self.interrupted = False

    def settle(self, index: int, error: tuple[int, str] | None) -> None:
        if index >= len(self.ok) or self.ok[index] or index in self.errors:
            return
        if error is None:
            self.ok[index] = 1
        else:
            self.errors[index] = error
        self.waiting -= 1
        if self.waiting == 0:
            self.done.set()


Callback = Callable[[Msg], Awaitable[None]]


class Inbox:
    """A subscription of the client's, carried over to every new connection."""

    __slots__ = ("cb", "sub", "subject")

    def __init__(self, subject: str, cb: Callback) -> None:
        self.subject = subject
        self.cb = cb
        self.sub: NatsSub | None = None


class Client:
    """A nats-py connection that survives server restarts, and its own closing by the server.

    Publishing waits for the connection while the server is away (up to ``publish_timeout``) and
    resends what the server did not confirm; the ``Nats-Msg-Id`` header lets the server drop the
    copies it had in fact stored.
    """

    def __init__(self, settings: NatsSettings) -> None:
        self.settings = settings
        self._nc: NATS | None = None
        self.connected = asyncio.Event()
        self.on_reconnect: set[Callable[[], None]] = set()
        self._batches: dict[str, _Confirmations] = {}
        self._batch_ids = itertools.count(1)
        self._confirm_prefix = ""
        self._last_error: Exception | None = None
        self._open = False
        self._inboxes: set[Inbox] = set()
        self._reopening: asyncio.Task[None] | None = None
        self.reopened = 0
        """Connections opened again after the server closed one (see :meth:`_on_closed`)."""
        self.fast_wire = True
        """Hand many messages to nats-py's outgoing buffer as one piece of protocol (its
        ``_send_command``) instead of one ``publish`` call each: a third of the client CPU.
        Falls back to ``publish`` when the client lacks it, or while disconnected."""

    # connection -----------------------------------------------------------------------------

    @property
    def nc(self) -> NATS:
        nc = self._nc
        if nc is None or nc.is_closed:
            if nc is not None and self._open:
                # nats-py can close without calling closed_cb (see _reopen_closed)
                self._reopen_closed(nc)
                raise TransportError("the NATS connection was closed; opening a new one")
            raise TransportError("the NATS transport is not connected (call connect() first)")
        return nc

    @property
    def max_payload(self) -> int:
        """The largest message (headers and payload) the connected server accepts."""
        return int(self.nc.max_payload)

    @property
    def is_open(self) -> bool:
        """Opened and not closed by :meth:`close`: connected, or getting a connection back."""
        return self._open

    async def open(self) -> None:
        if self._open:
            return
        nc = await self._connect()
        self._confirm_prefix = nc.new_inbox() + "."
        self._nc = nc
        self._open = True
        try:
            await self._subscribe_all(nc)
        except ChoreographError:
            await self.close()
            raise
        self.connected.set()

    async def _connect(self) -> NATS:
        """A new nats-py connection: a few attempts, then TransportError."""
        options = self.settings.connect_options()
        doing = f"connecting to {redact(self.settings.url)}"
        nc = NATS()
        # nats-py can hang after a failed TLS handshake: bound the whole attempt
        budget = 3 * (self.settings.connect_timeout + self.settings.reconnect_wait) + 1
        self._last_error = None
        try:
            with translated(doing):
                await asyncio.wait_for(
                    nc.connect(
                        **options,
                        error_cb=self._on_error,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                        closed_cb=functools.partial(self._on_closed, nc),
                    ),
                    budget,
                )
        except ChoreographError as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 1)
            if isinstance(exc.__cause__, TimeoutError) and self._last_error is not None:
                raise translate(self._last_error, doing) from self._last_error
            raise
        nc.options["max_reconnect_attempts"] = -1  # connected once: from now on, never give up
        if self.fast_wire and callable(getattr(nc, "_parse_header_lines", None)):
            # the header block of nearly every message is one line, Nats-Msg-Id: a short cut
            # for it saves ~2 µs of client CPU per delivery (anything else: nats-py's parser)
            general = nc._parse_header_lines
            nc._parse_header_lines = functools.partial(_parse_id_header, general)  # type: ignore[method-assign]
        self.fast_wire = self.fast_wire and callable(getattr(nc, "_send_command", None))
        return nc

    async def subscribe(self, subject: str, cb: Callback) -> Inbox:
        """Receive ``subject`` with ``cb``, on this connection and on every one that replaces it
        (see :meth:`_reopen`)."""
        inbox = Inbox(subject, cb)
        with translated(f"subscribing to {subject}"):
            inbox.sub = await self.nc.subscribe(subject, cb=cb)
        self._inboxes.add(inbox)
        return inbox

    async def unsubscribe(self, inbox: Inbox, drain: float | None = None) -> None:
        """Stop receiving on ``inbox``; with ``drain`` (seconds), first take in what the server
        already sent to it."""
        self._inboxes.discard(inbox)
        sub, inbox.sub = inbox.sub, None
        if sub is None or self._nc is None or self._nc.is_closed:
            return
        try:
            if drain is not None and self.connected.is_set():
                await asyncio.wait_for(sub.drain(), drain)  # type: ignore[no-untyped-call]
            else:
                await sub.unsubscribe()
        except (ne.Error, OSError, TimeoutError) as exc:
            log.debug("unsubscribing from %s failed: %s", inbox.subject, exc)

    async def _subscribe_all(self, nc: NATS) -> None:
        with translated("subscribing to publish confirmations"):
            await nc.subscribe(self._confirm_prefix + ">", cb=self._on_confirmation)
            for inbox in list(self._inboxes):
                inbox.sub = await nc.subscribe(inbox.subject, cb=inbox.cb)

    async def close(self) -> None:
        self._open = False
        nc, self._nc = self._nc, None
        self.connected.clear()
        self._interrupt_batches()
        self._inboxes.clear()
        reopening, self._reopening = self._reopening, None
        if reopening is not None:
            reopening.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reopening
        if nc is None or nc.is_closed:
            return
        try:
            if nc.is_connected:
                await nc.flush(timeout=2)
        except (ne.Error, OSError) as exc:
            log.debug("flush before close failed: %s", exc)
        try:
            # bounded: nats-py can wait long for a reconnection attempt to a server that is gone
            await asyncio.wait_for(nc.close(), _CLOSE_TIMEOUT)
        except (ne.Error, OSError, TimeoutError) as exc:
            log.debug("close failed: %s", exc)
        # nats-py's reconnection loop can swallow the cancellation close() sends it (a timeout
        # racing the cancel inside it) and then tries for ever: cancel it until it is done
        reconnecting: asyncio.Task[None] | None = getattr(nc, "_reconnection_task", None)
        for _ in range(40):
            if reconnecting is None or reconnecting.done():
                break
            reconnecting.cancel()
            await asyncio.sleep(0.05)

    def _interrupt_batches(self) -> None:
        # confirmations in flight may never come: let their publishers resend after reconnecting
        for batch in self._batches.values():
            batch.interrupted = True
            batch.done.set()

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        # reconnection attempts while the server is away report here: expected, so quiet
        level = logging.DEBUG if isinstance(exc, OSError | ne.UnexpectedEOF) else logging.WARNING
        log.log(level, "NATS client error: %s: %s", type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        log.info("disconnected from NATS; reconnecting")
        self.connected.clear()
        self._interrupt_batches()

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")
        self.connected.set()
        for callback in list(self.on_reconnect):
            callback()

    async def _on_closed(self, nc: NATS) -> None:
        self._reopen_closed(nc)

    def _reopen_closed(self, nc: NATS) -> None:
        """Start getting a new connection in place of ``nc``, which nats-py closed for good.

        nats-py closes for good when the server ends the connection with an error (a protocol
        violation such as a payload over max_payload, a slow consumer, an authorization
        expiry...). It tells ``closed_cb``, except when its close raises first: flushing what it
        still had to send onto the reset socket (nats-py 2.16 ``Client._close``). So this runs
        from ``closed_cb`` and from any use of :attr:`nc` that finds the connection closed.
        """
        if nc is not self._nc or not self._open:
            return  # closed by close(), or an old connection already replaced
        if self._reopening is not None and not self._reopening.done():
            return
        self.connected.clear()
        self._interrupt_batches()
        log.warning(
            "NATS closed the connection (%s); opening a new one",
            self._last_error or "no reason given",
        )
        self._reopening = asyncio.create_task(self._reopen(), name="nats-reopen")

    async def _reopen(self) -> None:
        """Connect again, for ever (every ``reconnect_wait``, growing to 5 s), until
        :meth:`close`; then subscribe every inbox again and tell the subscriptions, whose pull
        requests died with the old connection."""
        pause = self.settings.reconnect_wait
        while self._open:
            try:
                nc = await self._connect()
                await self._subscribe_all(nc)
            except ChoreographError as exc:
                log.warning("NATS: a new connection failed, trying again in %.1f s: %s", pause, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            if not self._open:
                with contextlib.suppress(Exception):
                    await nc.close()
                return
            self._nc = nc
            self.reopened += 1
            log.warning("NATS: connected again")
            await self._on_reconnected()
            return

    async def wait_connected(self, deadline: float, doing: str) -> None:
        """Return once connected; TransportError if not connected by ``deadline`` (loop time)."""
        if self.connected.is_set():
            self.nc  # noqa: B018 - raises if closed
            return
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):  # not wait_for: see choreograph._cancel
                await self.connected.wait()
        except TimeoutError:
            raise TransportError(
                f"NATS: {doing}: not connected to the server (still reconnecting)"
            ) from None
        self.nc  # noqa: B018

    # JetStream API ---------------------------------------------------------------------------

    async def api(
        self, subject: str, request: dict[str, Any] | None = None, *, retry: bool = True
    ) -> dict[str, Any]:
        """One ``$JS.API`` request. An error answer raises nats-py's APIError (subclass), for the
        caller to expect or translate; anything else raises TransportError.

        While the server or the cluster cannot answer (see :func:`is_transient`: timeouts, no
        responders, no leader...), the request is sent again with a growing pause, each time
        logged, for up to ``api_retry_timeout``. Every request this transport makes is safe to
        repeat (creating what exists with the same configuration is a no-op on the server).
        ``retry=False``: one attempt, for a request whose failure costs nothing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.api_retry_timeout
        payload = json.dumps(request).encode() if request is not None else b""
        if not retry:
            return await self._api_once(
                subject, payload, loop.time() + self.settings.request_timeout
            )
        pause = _API_FIRST_PAUSE
        for attempt in itertools.count(1):
            try:
                return await self._api_once(subject, payload, deadline)
            except (APIError, TransportError) as exc:
                left = deadline - loop.time()
                if not is_transient(exc) or left <= 0 or not self.is_open:
                    raise
                log.warning(
                    "JetStream request %s failed (attempt %d), retrying in %.1f s: %s",
                    subject,
                    attempt,
                    min(pause, left),
                    exc,
                )
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, _API_MAX_PAUSE)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _api_once(self, subject: str, payload: bytes, deadline: float) -> dict[str, Any]:
        await self.wait_connected(deadline, subject)
        doing = f"JetStream request {subject}"
        try:
            reply = await self.nc.request(
                "$JS.API." + subject, payload, timeout=self.settings.request_timeout
            )
        except ne.NoRespondersError as exc:
            raise translate(ServiceUnavailableError(), doing) from exc
        except TRANSLATED as exc:
            raise translate(exc, doing) from exc
        answer: dict[str, Any] = json.loads(reply.data)
        if "error" in answer:
            # left to the caller, who knows which errors are expected (not found...)
            raise APIError.from_error(answer["error"])
        return answer

    # confirmed publishing --------------------------------------------------------------------

    async def publish(self, outgoing: Sequence[Outgoing]) -> None:
        """Store every message in JetStream; return once the server confirmed each of them."""
        if not outgoing:
            return
        self._check_sizes(outgoing)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.publish_timeout
        pending = list(range(len(outgoing)))
        while pending:
            await self.wait_connected(deadline, "publishing")
            batch_id = str(next(self._batch_ids))
            batch = _Confirmations(len(pending))
            self._batches[batch_id] = batch
            prefix = f"{self._confirm_prefix}{batch_id}."
            try:
                await self._send(outgoing, pending, prefix, batch)
                if not batch.interrupted:
                    wait = min(self.settings.confirm_timeout, deadline - loop.time())
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(wait, 0.001)):  # see choreograph._cancel
                            await batch.done.wait()
            finally:
                del self._batches[batch_id]
            refused = [
                (outgoing[pending[i]][0], code, text)
                for i, (code, text) in batch.errors.items()
                if code not in _RETRYABLE_CODES
            ]
            if refused:
                subject, code, text = refused[0]
                raise TransportError(
                    f"NATS: JetStream refused {len(refused)} of {len(outgoing)} messages "
                    f"(first: {subject}: {code} {text})"
                )
            pending = [index for i, index in enumerate(pending) if not batch.ok[i]]
            if pending and loop.time() >= deadline:
                raise TransportError(
                    f"NATS: {len(pending)} of {len(outgoing)} messages not confirmed by the "
                    f"server within publish_timeout={self.settings.publish_timeout:g} s"
                )
            if pending and batch.errors:
                await asyncio.sleep(0.05)  # JetStream not ready yet: do not spin

    def _check_sizes(self, outgoing: Sequence[Outgoing]) -> None:
        """PayloadTooLarge, before anything is sent, for a message the server would refuse: a
        payload over max_payload makes nats-server close the connection."""
        limit = self.max_payload
        for subject, payload, headers in outgoing:
            # headers are small next to the headroom below it: measured only near the limit
            if len(payload) <= limit - _HEADER_SLACK:
                continue
            size = len(payload) + (len(encode_headers(headers)) if headers else 0)
            if size > limit:
                raise PayloadTooLarge(
                    f"NATS: a message to {subject[:200]} is {size} bytes with its headers; the "
                    f"server's max_payload is {limit}"
                )

    async def _send(
        self, outgoing: Sequence[Outgoing], pending: list[int], prefix: str, batch: _Confirmations
    ) -> None:
        nc = self.nc
        try:
            if self.fast_wire and nc.is_connected:
                await self._send_fast(outgoing, pending, prefix.encode())
                return
            for i, index in enumerate(pending):
                if batch.interrupted:
                    return
                subject, payload, headers = outgoing[index]
                await nc.publish(subject, payload, reply=f"{prefix}{i}", headers=headers)
        except (ne.OutboundBufferLimitError, ne.ConnectionReconnectingError):
            batch.interrupted = True  # the rest goes out again after the reconnection
        except ne.MaxPayloadError as exc:
            raise TransportError(
                f"NATS: a message exceeds the server's max_payload ({nc.max_payload} bytes): {exc}"
            ) from exc
        except (ne.Error, OSError) as exc:
            if not self.is_open:
                raise TransportError("NATS: publishing: the transport was closed") from exc
            batch.interrupted = True

    async def _send_fast(
        self, outgoing: Sequence[Outgoing], pending: list[int], prefix: bytes
    ) -> None:
        chunks: list[bytes] = []
        size = 0
        for i, index in enumerate(pending):
            subject, payload, headers = outgoing[index]
            if headers:
                head = encode_headers(headers)
                line = b"HPUB %s %s%d %d %d\r\n" % (
                    subject.encode(),
                    prefix,
                    i,
                    len(head),
                    len(head) + len(payload),
                )
                chunks += (line, head, payload, b"\r\n")
                size += len(line) + len(head) + len(payload) + 2
            else:
                line = b"PUB %s %s%d %d\r\n" % (subject.encode(), prefix, i, len(payload))
                chunks += (line, payload, b"\r\n")
                size += len(line) + len(payload) + 2
            if size >= _WRITE_CHUNK:
                await self._write(chunks)
                chunks, size = [], 0
        if chunks:
            await self._write(chunks)

    async def _write(self, chunks: list[bytes]) -> None:
        nc: Any = self.nc  # nats-py internals, checked for at connect time
        await nc._send_command(b"".join(chunks))
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()

    async def settle_confirmed(self, subject: str, payload: bytes, doing: str) -> None:
        """Send one settlement (nak, term) as a request: the server answers once it processed
        it. Resent, across reconnects, until ``publish_timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.publish_timeout
        while True:
            await self.wait_connected(deadline, doing)
            timeout = max(0.05, min(self.settings.request_timeout, deadline - loop.time()))
            try:
                await self.nc.request(subject, payload, timeout=timeout)
                return
            except (
                ne.TimeoutError,
                ne.NoRespondersError,
                ne.ConnectionClosedError,
                OSError,
            ) as exc:
                if loop.time() >= deadline or not self.is_open:
                    raise translate(exc, doing) from exc
                await asyncio.sleep(0.05)

    async def send(self, subjects: Sequence[str], payload: bytes) -> None:
        """Publish one small payload (an ack, a nak...) to each subject, without confirmation."""
        nc = self.nc
        if self.fast_wire and nc.is_connected:
            tail = b" %d\r\n%s\r\n" % (len(payload), payload)
            chunks = [b"PUB " + subject.encode() + tail for subject in subjects]
            for start in range(0, len(chunks), 4096):
                await self._write(chunks[start : start + 4096])
            return
        for subject in subjects:
            await nc.publish(subject, payload)

    async def _on_confirmation(self, msg: Msg) -> None:
        batch_id, _, index = msg.subject[len(self._confirm_prefix) :].partition(".")
        batch = self._batches.get(batch_id)
        if batch is None:
            return  # a late answer to an attempt that was given up (its message is resent)
        data = msg.data
        if not data:
            status = (msg.headers or {}).get("Status", "")
            batch.settle(int(index), (int(status) if status.isdigit() else 503, "no responders"))
        elif b'"error"' in data:
            error = json.loads(data).get("error", {})
            code = int(error.get("code", 500))
            text = f"{error.get('err_code', '')} {error.get('description', '')}".strip()
            batch.settle(int(index), (code, text))
        else:
            batch.settle(int(index), None)
