"""The ``redis://`` transport: connection, retries across outages, publishing, dead letters."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from choreograph._cancel import honouring_cancel
from choreograph.envelope import partition_hash
from choreograph.errors import (
    ChoreographError,
    ConfigurationError,
    PayloadTooLarge,
    TransportError,
)
from choreograph.transport import (
    DeadLetter,
    Failure,
    Message,
    Transport,
    check_group,
    oversized,
    redact,
    split_oversized,
)
from choreograph.transports.redis._errors import REFUSED, RETRIED, translate_error
from choreograph.transports.redis._lua import SCRIPTS
from choreograph.transports.redis._partitions import PartitionedSubscription
from choreograph.transports.redis._records import HASH, RECORD, stream_id_key
from choreograph.transports.redis._settings import RedisSettings
from choreograph.transports.redis._subscription import RedisSubscription

log = logging.getLogger("choreograph.transports.redis")
T = TypeVar("T")

_PUBLISH_CHUNK_BYTES = 4 * 1024 * 1024
"""A publish is sent as scripts of about this size, so no script holds Redis for long."""
_DEFAULT_BULK_LEN = 512 * 1024 * 1024
"""Redis's default ``proto-max-bulk-len``: the largest string one command argument may be."""
_DEAD_LETTER_ID = re.compile(r"^([A-Za-z0-9_-]{1,100}):(\d+-\d+)$")


class RedisTransport(Transport):
    """The transport contract on Redis Streams. The package docstring shows the key layout."""

    scheme = "redis"
    member_order = "group"

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        ns = settings.namespace
        self._prefix = f"{{{ns}}}:"
        self._groups_key = f"{self._prefix}groups"
        self._delayed_key = f"{self._prefix}delayed"
        self._delayed_counts_key = f"{self._prefix}delayed:n"
        self._parts_key = f"{self._prefix}parts"
        # Whether publish sends the hashes of the messages' partition keys: from the start when
        # this transport partitions a group, else once Redis asked for them (see _lua._PUBLISH).
        self._hash_keys = bool(settings.partitioned_groups)
        self._client: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._declared: dict[str, set[str]] = {}
        self._subscriptions: set[RedisSubscription] = set()
        self._must_redeclare = False
        self._chunk_bytes = _PUBLISH_CHUNK_BYTES

    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(RedisSettings.from_url(url))

    # keys

    def _stream(self, group: str) -> str:
        return f"{self._prefix}g:{group}"

    def _dlq(self, group: str) -> str:
        return f"{self._prefix}dlq:{group}"

    def _partitions(self, group: str) -> int:
        """The partitions of ``group`` as configured (0: not partitioned)."""
        s = self.settings
        return s.partitions if group in s.partitioned_groups else 0

    def orders_across_members(self, group: str) -> bool:
        return group in self.settings.partitioned_groups

    # connection

    async def connect(self) -> None:
        if self._client is not None:
            return
        client = Redis.from_pool(self._pool())
        self._client = client
        self._scripts = {name: client.register_script(source) for name, source in SCRIPTS.items()}
        try:
            info = await self._call(client.info, "connect", budget=self.settings.connect_timeout)
            version = str(info.get("redis_version", "0"))
            if tuple(int(p) for p in re.findall(r"\d+", version)[:2]) < (6, 2):
                raise ConfigurationError(f"the redis transport needs Redis >= 6.2, not {version}")
            self._fit_to(await self._bulk_len(client))
        except BaseException:
            self._client = None
            await client.aclose()
            raise

    async def _bulk_len(self, client: Redis) -> int:
        """The server's ``proto-max-bulk-len`` (its default when CONFIG is not allowed)."""
        try:
            reply: Any = await self._call(
                lambda: client.config_get("proto-max-bulk-len"), "connect", retry=False
            )
            return int(reply.get("proto-max-bulk-len", _DEFAULT_BULK_LEN))
        except (ChoreographError, ValueError) as exc:
            log.info("redis: CONFIG GET proto-max-bulk-len not allowed (%s); assuming 512 MiB", exc)
            return _DEFAULT_BULK_LEN

    def _fit_to(self, bulk_len: int) -> None:
        """Size the limits so that no argument sent to Redis outgrows ``bulk_len``: a publish
        chunk (under half of it, plus one message) and a message, dead letter or replay body
        (under the other half, with room for its id, topic and group)."""
        self._chunk_bytes = min(_PUBLISH_CHUNK_BYTES, bulk_len // 2)
        self.max_message_bytes = min(self.max_message_bytes, bulk_len // 2 - 64 * 1024)

    def _pool(self) -> BlockingConnectionPool:
        s = self.settings
        parts = urlsplit(s.url)
        scheme = "rediss" if s.tls else parts.scheme
        url = urlunsplit((scheme, parts.netloc, parts.path, "", ""))
        options: dict[str, Any] = {
            "max_connections": s.max_connections,
            "timeout": s.socket_timeout,
            "socket_timeout": s.socket_timeout,
            "socket_connect_timeout": min(s.connect_timeout, s.socket_timeout),
            "socket_keepalive": True,
            # Retries happen in RedisTransport._call, which also restores declarations.
            "retry": Retry(NoBackoff(), 0),
            "protocol": 2,
            "client_name": f"choreograph-{s.namespace}",
        }
        if s.password_env:
            password = os.environ.get(s.password_env)
            if password is None:
                raise ConfigurationError(
                    f"environment variable {s.password_env} (password_env) is not set"
                )
            options["password"] = password
        if scheme == "rediss":
            options["ssl_cert_reqs"] = "required" if s.tls_verify else "none"
            options["ssl_check_hostname"] = s.tls_verify
            if s.tls_ca_file:
                options["ssl_ca_certs"] = s.tls_ca_file
            if s.tls_cert_file:
                options["ssl_certfile"] = s.tls_cert_file
            if s.tls_key_file:
                options["ssl_keyfile"] = s.tls_key_file
        try:
            return BlockingConnectionPool.from_url(url, **options)
        except ValueError as exc:
            raise ConfigurationError(f"invalid Redis URL {redact(s.url)}: {exc}") from None

    async def delete_namespace(self) -> None:
        client = self._redis()
        keys = [key async for key in client.scan_iter(match=f"{self._prefix}*", count=500)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            await sub.close()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _redis(self) -> Redis:
        if self._client is None:
            raise TransportError("the redis transport is not connected (call connect() first)")
        return self._client

    async def _call(
        self,
        op: Callable[[], Awaitable[T]],
        what: str,
        *,
        budget: float | None = None,
        retry: bool = True,
    ) -> T:
        """Run ``op``, retrying while Redis is unreachable (up to ``budget``, by default
        ``reconnect_timeout``), restoring this transport's declarations after a reconnect or when
        Redis lost them (a restart without persistence), and translating errors. With
        ``retry=False`` (giving back on close) it tries once and restores nothing."""
        self._redis()  # closed transports refuse
        budget = self.settings.reconnect_timeout if budget is None else budget
        failing_since: float | None = None
        backoff = 0.05
        restored = False
        while True:
            try:
                if self._must_redeclare and self._declared:
                    await self._redeclare()
                # a cancellation redis-py loses (see choreograph._cancel) is raised here
                return await honouring_cancel(op())
            except REFUSED as exc:
                raise translate_error(exc) from exc
            except RETRIED as exc:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    # a first connect that keeps failing ends in a clean error of its own
                    level = logging.INFO if what == "connect" else logging.WARNING
                    log.log(level, "redis: %s failed (%s); retrying", what, exc)
                if not retry or now - failing_since >= budget:
                    raise TransportError(
                        f"{what}: Redis at {redact(self.settings.url)} did not answer "
                        f"for {now - failing_since:.1f}s: {exc}"
                    ) from exc
                self._must_redeclare = True
                await asyncio.sleep(min(backoff, max(0.0, failing_since + budget - now)))
                backoff = min(backoff * 2, 1.0)
            except rx.ResponseError as exc:
                if retry and "NOGROUP" in str(exc) and not restored and self._declared:
                    # The group vanished: Redis restarted without persistence, or was flushed.
                    log.warning("redis: consumer group missing during %s; declaring again", what)
                    restored = True
                    self._must_redeclare = True
                    continue
                raise translate_error(exc) from exc
            except rx.RedisError as exc:
                raise translate_error(exc) from exc

    async def _script(
        self, name: str, keys: list[Any], args: list[Any], what: str, *, retry: bool = True
    ) -> Any:
        self._redis()
        script = self._scripts[name]
        return await self._call(lambda: script(keys=keys, args=args), what, retry=retry)

    async def _redeclare(self) -> None:
        for group, topics in list(self._declared.items()):
            await self._scripts["declare"](
                keys=[self._groups_key, self._stream(group), self._parts_key],
                args=[self._prefix, group, self._partitions(group), *sorted(topics)],
            )
        self._must_redeclare = False

    async def _wait_replicas(self, what: str) -> None:
        wanted = self.settings.wait_replicas
        if not wanted:
            return
        client = self._redis()
        timeout_ms = max(1, int(self.settings.wait_timeout * 1000))
        acked = await self._call(lambda: client.wait(wanted, timeout_ms), what)
        if acked < wanted:
            raise TransportError(
                f"{what}: only {acked} of {wanted} replicas confirmed within "
                f"{self.settings.wait_timeout}s"
            )

    # the contract

    async def declare_group(self, group: str, topics: Collection[str]) -> None:
        check_group(group)
        self._redis()
        partitions = self._partitions(group)
        stored = await self._script(
            "declare",
            [self._groups_key, self._stream(group), self._parts_key],
            [self._prefix, group, partitions, *sorted(topics)],
            "declare_group",
        )
        if int(stored) != partitions:
            raise ConfigurationError(
                f"group {group!r} has {int(stored)} partitions on Redis (0: not partitioned), "
                f"declared here with {partitions}: give every member the same 'partitioned' and "
                "'partitions' options (a group's partitions are set when it is first declared)"
            )
        self._declared.setdefault(group, set()).update(topics)

    async def publish(self, messages: Sequence[Message]) -> None:
        self._redis()
        fits, over = split_oversized(messages, self.max_message_bytes)
        pack = RECORD.pack
        chunks: list[tuple[bytes, Sequence[Message]]] = []
        parts: list[bytes] = []
        first = size = 0
        for n, m in enumerate(fits):
            body = m.body
            i = m.id.encode()
            t = m.topic.encode()
            g = check_group(m.group).encode() if m.group else b""
            parts += (pack(len(i), len(t), len(body), len(g)), i, t, body, g)
            size += len(i) + len(t) + len(body) + len(g) + 16
            if size >= self._chunk_bytes:
                chunks.append((b"".join(parts), fits[first : n + 1]))
                parts, first, size = [], n + 1, 0
        if parts:
            chunks.append((b"".join(parts), fits[first:]))
        for chunk, sent in chunks:
            hashes = _hashes(sent) if self._hash_keys else b""
            added = await self._script("publish", [], [self._prefix, chunk, hashes], "publish")
            if added == -1:  # a partitioned group is among the receivers: send the hashes
                self._hash_keys = True
                await self._script("publish", [], [self._prefix, chunk, _hashes(sent)], "publish")
        for m in over:
            ref, why = oversized(m, self.max_message_bytes)
            args = [self._prefix, ref.group or "", ref.id, ref.topic, ref.body, why.reason,
                    why.error_type, why.error, repr(time.time())]  # fmt: skip
            await self._script("bury_unsent", [], args, "publish")
        if chunks or over:
            await self._wait_replicas("publish")

    async def subscribe(
        self, group: str, topics: Collection[str], *, lease: float = 30.0
    ) -> RedisSubscription:
        if not lease > 0 or math.isinf(lease):
            raise ConfigurationError(f"lease must be a positive number of seconds, not {lease}")
        await self.declare_group(group, topics)
        partitions = self._partitions(group)
        if partitions:
            sub: RedisSubscription = PartitionedSubscription(
                self, group, frozenset(topics), lease, partitions
            )
        else:
            sub = RedisSubscription(self, group, frozenset(topics), lease)
        self._subscriptions.add(sub)
        if isinstance(sub, PartitionedSubscription):
            await sub.start()
        return sub

    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        client = self._redis()
        if limit <= 0:
            return []
        if group is not None:
            groups = [group]
        else:
            members: Any = await self._call(
                lambda: client.smembers(self._groups_key), "dead_letters"
            )
            groups = sorted(g.decode() for g in members)

        async def fetch() -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for name in groups:
                pipe.xrange(self._dlq(name), count=limit)
            return await pipe.execute()

        replies = await self._call(fetch, "dead_letters") if groups else []
        found = [
            _dead_letter(name, eid, fields)
            for name, entries in zip(groups, replies, strict=True)
            for eid, fields in entries
        ]
        found.sort(key=lambda d: stream_id_key(d.id.partition(":")[2]))
        return found[:limit]

    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        client = self._redis()
        parsed = _DEAD_LETTER_ID.match(dead_letter_id)
        if parsed is None:
            return None
        group, eid = parsed.groups()
        entries: Any = await self._call(
            lambda: client.xrange(self._dlq(group), eid, eid, count=1), "get_dead_letter"
        )
        return _dead_letter(group, entries[0][0], entries[0][1]) if entries else None

    async def replay(self, dead_letter_id: str, body: bytes | None = None) -> bool:
        self._redis()
        if body is not None and len(body) > self.max_message_bytes:
            raise PayloadTooLarge(
                f"replacement body is {len(body)} bytes; the limit is {self.max_message_bytes}"
            )
        parsed = _DEAD_LETTER_ID.match(dead_letter_id)
        if parsed is None:
            return False
        group, eid = parsed.groups()
        done = await self._script(
            "replay",
            [self._dlq(group), self._stream(group)],
            [eid, group, "0" if body is None else "1", body or b""],
            "replay",
        )
        if done:
            await self._wait_replicas("replay")
        return bool(done)

    async def discard(self, dead_letter_id: str) -> bool:
        client = self._redis()
        parsed = _DEAD_LETTER_ID.match(dead_letter_id)
        if parsed is None:
            return False
        group, eid = parsed.groups()
        removed = await self._call(lambda: client.xdel(self._dlq(group), eid), "discard")
        return bool(removed)

    async def lag(self, group: str) -> int | None:
        client = self._redis()
        stored: Any = await self._call(lambda: client.hget(self._parts_key, group), "lag")
        partitions = int(stored or 0)
        streams = [f"{self._stream(group)}:{p}" for p in range(partitions)] or [self._stream(group)]
        value = await self._script("lag", [self._delayed_counts_key, *streams], [group], "lag")
        return None if value < 0 else int(value)


def _hashes(messages: Sequence[Message]) -> bytes:
    """The hash of each message's partition key (its message id when it has none), packed."""
    pack = HASH.pack
    return b"".join(pack(partition_hash(m.body, m.id)) for m in messages)


def _dead_letter(group: str, eid: bytes, f: dict[bytes, bytes]) -> DeadLetter:
    """A dead letter from its entry in ``group``'s dead-letter stream."""
    return DeadLetter(
        id=f"{group}:{eid.decode()}",
        group=group,
        message=Message(
            f.get(b"id", b"").decode(), f.get(b"topic", b"").decode(), f.get(b"body", b"")
        ),
        failure=Failure(
            f.get(b"reason", b"").decode(),
            f.get(b"error_type", b"").decode(),
            f.get(b"error", b"").decode(),
            f.get(b"traceback", b"").decode(),
        ),
        attempts=int(f.get(b"attempts", b"0")),
        failed_at=float(f.get(b"failed_at", b"0")),
    )
