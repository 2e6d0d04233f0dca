"""``redis://`` — the bus on Redis Streams (Redis >= 6.2; built and tested on 7.0).

Every key lives under ``{<namespace>}:`` (the braces are a Redis Cluster hash tag, so a namespace
stays on one shard and the Lua scripts may touch all of its keys):

=========================  ===================================================================
``{ns}:g:<group>``         the group's stream, read through the consumer group ``<group>``
``{ns}:t:<topic>``         set of the groups that declared ``<topic>``
``{ns}:groups``            set of every declared group
``{ns}:delayed``           sorted set of pending retries, score = due time (server µs)
``{ns}:delayed:n``         hash group -> number of its pending retries (for :meth:`lag`)
``{ns}:dlq:<group>``       the group's dead letters, a stream
=========================  ===================================================================

Publishing fans out inside one Lua script: it reads each topic's set of groups and appends the
message to each group's stream, atomically, so a returned publish reached every group declared at
that moment. Settling (ack, retry, dead-letter, give back on close) is one script each, so the
entry leaves the stream in the same step as it lands where it goes next. Entries are deleted when
settled: a group's stream only ever holds what is undelivered or leased. See
``docs/transport-redis.md`` for the guarantees and for running it in production.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from choreograph.errors import (
    ChoreographError,
    ConfigurationError,
    PayloadTooLarge,
    TransportError,
)
from choreograph.transport import (
    DeadLetter,
    Delivery,
    Failure,
    Message,
    Subscription,
    Transport,
    TransportSettings,
    check_group,
    redact,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

_PUBLISH_CHUNK_BYTES = 4 * 1024 * 1024
"""A publish is sent as scripts of about this size, so no script holds Redis for long."""
_READ_BUDGET_BYTES = 8 * 1024 * 1024
"""A read stops taking entries once it holds about this many body bytes."""
_MOVE_LIMIT = 500
"""Due retries moved per housekeeping pass (the next pass follows at once when there are more)."""
_REAP_IDLE_MS = 600_000
"""A consumer holding nothing and silent for this long is a member that is gone: forget it."""
_ACK_CHUNK = 4000
_CLAIM_LIMIT = 1000
"""Both stay well under what one Lua ``unpack`` can spread into a command's arguments."""
_FRAME = struct.Struct(">II")
_RECORD = struct.Struct(">IIII")
_DEAD_LETTER_ID = re.compile(r"^([A-Za-z0-9_-]{1,100}):(\d+-\d+)$")


@dataclass(frozen=True)
class RedisSettings(TransportSettings):
    """Options of ``redis://host:port/db?option=value&...`` (``rediss://`` for TLS).

    Credentials go in the URL's user info or, better, in the environment variable that
    ``password_env`` names, so they never appear in code or configuration files.
    """

    tls: bool = False
    """Use TLS (the same as a ``rediss://`` URL)."""
    tls_ca_file: str = ""
    """CA bundle to verify the server with (default: the system's)."""
    tls_cert_file: str = ""
    """Client certificate, for servers that require one (``tls-auth-clients yes``)."""
    tls_key_file: str = ""
    tls_verify: bool = True
    """Verify the server certificate and host name. Turn off only for tests."""
    password_env: str = ""
    """Name of an environment variable holding the password (overrides the URL's)."""
    connect_timeout: float = 5.0
    """Seconds :meth:`RedisTransport.connect` keeps trying before it gives up."""
    socket_timeout: float = 10.0
    """Seconds one command may take before its connection is considered dead."""
    reconnect_timeout: float = 30.0
    """Seconds an operation keeps retrying while Redis is unreachable, then TransportError."""
    max_connections: int = 64
    """Connections per transport; blocking reads hold one each while they wait."""
    housekeeping_interval: float = 0.5
    """How often a member moves due retries and takes over expired leases (the upper bound on
    how late those happen)."""
    wait_replicas: int = 0
    """With replicas: a publish, retry or dead-letter returns only when this many replicas have
    it (Redis WAIT); fewer within ``wait_timeout`` raises TransportError."""
    wait_timeout: float = 1.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigurationError(f"not a redis:// URL: {redact(self.url)}")
        try:
            parts.port  # noqa: B018 - parsing it validates it
        except ValueError:
            raise ConfigurationError(f"invalid port in {redact(self.url)}") from None
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ConfigurationError(f"the database in {redact(self.url)} must be a number")
        positive = {
            "connect_timeout": self.connect_timeout,
            "socket_timeout": self.socket_timeout,
            "reconnect_timeout": self.reconnect_timeout,
            "housekeeping_interval": self.housekeeping_interval,
            "wait_timeout": self.wait_timeout,
            "max_connections": self.max_connections,
        }
        for name, value in positive.items():
            if not value > 0 or math.isinf(value):
                raise ConfigurationError(f"option {name!r} must be a positive number, not {value}")
        if self.wait_replicas < 0:
            raise ConfigurationError("option 'wait_replicas' must not be negative")
        if self.password_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.password_env):
            raise ConfigurationError(
                f"option 'password_env' is not a variable name: {self.password_env!r}"
            )


# Error translation ------------------------------------------------------------------------------

_RETRIED = (rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError)
"""Errors an operation is retried on (with backoff, up to ``reconnect_timeout``): the server is
away, restarting, loading its data, or was demoted in a failover."""
_REFUSED = (rx.AuthenticationError, rx.AuthorizationError, rx.NoPermissionError)


def translate_error(exc: rx.RedisError) -> ChoreographError:
    """The choreograph error for a redis-py error: bad credentials or missing ACL permissions are
    configuration errors (retrying cannot fix them); everything else is a TransportError."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, rx.AuthenticationError):
        return ConfigurationError(f"Redis refused the credentials: {text}")
    if isinstance(exc, (rx.AuthorizationError, rx.NoPermissionError)):
        return ConfigurationError(
            f"the Redis user lacks a permission the transport needs: {text} "
            "(see docs/transport-redis.md, 'ACL')"
        )
    if isinstance(exc, rx.BusyLoadingError):
        return TransportError(f"Redis is still loading its data: {text}")
    if isinstance(exc, (rx.ConnectionError, rx.TimeoutError)):
        return TransportError(f"Redis unreachable: {text}")
    if isinstance(exc, rx.ReadOnlyError):
        return TransportError(f"Redis is a read-only replica (failover in progress?): {text}")
    if isinstance(exc, rx.OutOfMemoryError):
        return TransportError(f"Redis is out of memory (maxmemory reached): {text}")
    if isinstance(exc, rx.ResponseError):
        return TransportError(f"Redis refused the operation: {text}")
    return TransportError(f"Redis client error: {text}")


# Lua --------------------------------------------------------------------------------------------

# Entries hold one field ``m``, the message record: four big-endian uint32 (the lengths of the
# message id, topic, body and target group) then those four strings, exactly as the client packs
# them for publish; and ``a``, the attempt, only when it is above 1 (after a retry or a give-back).
# Reads return the entries framed in one string: per entry two uint32 (length of the entry id,
# attempt), the entry id, the record. One field per entry and one string per reply keep both
# Redis's Lua work and the client's parsing small. Dead letters are stored readable, field by field.
_LUA_LIB = """
local function record(id, topic, body, target)
  return struct.pack('>IIII', #id, #topic, #body, #target) .. id .. topic .. body .. target
end
local function unrecord(r)
  local li, lt, lb, lg, s = struct.unpack('>IIII', r, 1)
  local id = string.sub(r, s, s + li - 1); s = s + li
  local topic = string.sub(r, s, s + lt - 1); s = s + lt
  return id, topic, string.sub(r, s, s + lb - 1), string.sub(r, s + lb, s + lb + lg - 1)
end
local function add(stream, rec, attempt)
  attempt = tonumber(attempt) or 1
  if attempt > 1 then return redis.call('XADD', stream, '*', 'm', rec, 'a', attempt) end
  return redis.call('XADD', stream, '*', 'm', rec)
end
local function fields(f)
  local m = {}
  for j = 1, #f, 2 do m[f[j]] = f[j + 1] end
  return m
end
local function entry(f)
  if #f == 2 and f[1] == 'm' then return f[2], 1 end
  local m = fields(f)
  return m['m'] or record('', '', '', ''), tonumber(m['a']) or 1
end
local function frame(out, eid, f, extra)
  local rec, attempt = entry(f)
  local k = #out
  out[k + 1] = struct.pack('>II', #eid, attempt + extra)
  out[k + 2] = eid
  out[k + 3] = rec
  return #rec + #eid + 8
end
local function owned(stream, group, eid, consumer)
  return #redis.call('XPENDING', stream, group, eid, eid, 1, consumer) > 0
end
local function take(stream, group, eid)
  local e = redis.call('XRANGE', stream, eid, eid)
  redis.call('XACK', stream, group, eid)
  redis.call('XDEL', stream, eid)
  if #e == 0 then return nil end
  return entry(e[1][2])
end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
"""

# KEYS: groups set, stream | ARGV: prefix, group, topics...
_DECLARE = """
local r = redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP', 1, true) then
  return r
end
redis.call('SADD', KEYS[1], ARGV[2])
for i = 3, #ARGV do redis.call('SADD', ARGV[1] .. 't:' .. ARGV[i], ARGV[2]) end
return 1
"""

# ARGV: prefix, the records of the messages, one after the other
_PUBLISH = """
local prefix, data = ARGV[1], ARGV[2]
local pos, size, cache, added = 1, #data, {}, 0
while pos <= size do
  local li, lt, lb, lg, s = struct.unpack('>IIII', data, pos)
  local last = s + li + lt + lb + lg - 1
  local rec = string.sub(data, pos, last)
  if lg > 0 then
    redis.call('XADD', prefix .. 'g:' .. string.sub(data, last - lg + 1, last), '*', 'm', rec)
    added = added + 1
  else
    local topic = string.sub(data, s + li, s + li + lt - 1)
    local streams = cache[topic]
    if not streams then
      streams = redis.call('SMEMBERS', prefix .. 't:' .. topic)
      for k = 1, #streams do streams[k] = prefix .. 'g:' .. streams[k] end
      cache[topic] = streams
    end
    for k = 1, #streams do redis.call('XADD', streams[k], '*', 'm', rec) end
    added = added + #streams
  end
  pos = last + 1
end
return added
"""

# KEYS: stream | ARGV: group, consumer, count, byte budget
_READ = """
local out, n, bytes = {}, 0, 0
local want, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local step = math.min(want, 32)
while n < want and bytes < budget do
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', step,
                       'STREAMS', KEYS[1], '>')
  if not r then break end
  local entries = r[1][2]
  for i = 1, #entries do
    bytes = bytes + frame(out, entries[i][1], entries[i][2], 0)
  end
  n = n + #entries
  if #entries < step then break end
  step = math.max(1, math.min(want - n, math.floor((budget - bytes) * n / bytes)))
end
return table.concat(out)
"""

# KEYS: stream, delayed, delayed counts | ARGV: prefix, group, me, my lease ms, want, reap ms
# Moves due retries (of every group) to their streams, then takes over this group's deliveries
# whose holder's lease ran out (each holder's lease is in its consumer name: "...~<ms>").
_HOUSEKEEP = """
local now = now_us()
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now),
                       'LIMIT', 0, __MOVE_LIMIT__)
for i = 1, #due do
  local r = cmsgpack.unpack(due[i])
  add(ARGV[1] .. 'g:' .. r[1], r[3], r[2])
  if redis.call('HINCRBY', KEYS[3], r[1], -1) <= 0 then redis.call('HDEL', KEYS[3], r[1]) end
  redis.call('ZREM', KEYS[2], due[i])
end
local wait = -1
if #due == __MOVE_LIMIT__ then
  wait = 0
else
  local head = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if head[2] then wait = math.max(0, tonumber(head[2]) - now) end
end
local out, got, want = {}, 0, tonumber(ARGV[5])
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[2])
if consumers.err then return redis.error_reply('NOGROUP ' .. consumers.err) end
for i = 1, #consumers do
  local c = fields(consumers[i])
  local name, pending = c['name'], tonumber(c['pending'])
  if pending > 0 and got < want then
    local lease = tonumber(string.match(name, '~(%d+)$')) or tonumber(ARGV[4])
    local expired = redis.call('XPENDING', KEYS[1], ARGV[2], 'IDLE', lease, '-', '+',
                               want - got, name)
    if #expired > 0 then
      local ids, counts = {}, {}
      for j = 1, #expired do
        ids[j] = expired[j][1]
        counts[expired[j][1]] = expired[j][4]
      end
      local claimed = redis.call('XCLAIM', KEYS[1], ARGV[2], ARGV[3], lease, unpack(ids))
      for j = 1, #claimed do
        local e = claimed[j]
        if e then
          frame(out, e[1], e[2], counts[e[1]])
          got = got + 1
        end
      end
    end
  elseif pending == 0 and tonumber(c['idle']) > tonumber(ARGV[6]) and name ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[2], name)
  end
end
return {string.format('%.0f', wait), table.concat(out)}
""".replace("__MOVE_LIMIT__", str(_MOVE_LIMIT))

# KEYS: stream | ARGV: group, entry ids...
_ACK = """
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
return n
"""

# KEYS: stream, delayed, delayed counts | ARGV: group, consumer, entry id, next attempt, delay µs
_RETRY = """
local group, me, eid = ARGV[1], ARGV[2], ARGV[3]
if not owned(KEYS[1], group, eid, me) then return 0 end
local rec = take(KEYS[1], group, eid)
if not rec then return 0 end
local delay = tonumber(ARGV[5])
if delay <= 0 then
  add(KEYS[1], rec, ARGV[4])
else
  local due = string.format('%.0f', now_us() + delay)
  redis.call('ZADD', KEYS[2], due, cmsgpack.pack({group, ARGV[4], rec, eid}))
  redis.call('HINCRBY', KEYS[3], group, 1)
end
return 1
"""

# KEYS: stream, dead letters | ARGV: group, consumer, entry id, attempts, reason, error type,
# error, failed at
_DEAD_LETTER = """
local group, me, eid = ARGV[1], ARGV[2], ARGV[3]
if not owned(KEYS[1], group, eid, me) then return 0 end
local rec = take(KEYS[1], group, eid)
if not rec then return 0 end
local id, topic, body = unrecord(rec)
redis.call('XADD', KEYS[2], '*', 'id', id, 'topic', topic, 'body', body, 'group', group,
           'reason', ARGV[5], 'error_type', ARGV[6], 'error', ARGV[7], 'attempts', ARGV[4],
           'failed_at', ARGV[8])
return 1
"""

# KEYS: stream | ARGV: group, consumer, (entry id, attempt)...
# Gives a closing member's unsettled deliveries back: each goes to the end of the stream, with its
# attempt unchanged, where any member (blocked readers included) takes it at once.
_RELEASE = """
local group, me = ARGV[1], ARGV[2]
for i = 3, #ARGV, 2 do
  if owned(KEYS[1], group, ARGV[i], me) then
    local rec = take(KEYS[1], group, ARGV[i])
    if rec then add(KEYS[1], rec, ARGV[i + 1]) end
  end
end
if #redis.call('XPENDING', KEYS[1], group, '-', '+', 1, me) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], group, me)
end
return 1
"""

# KEYS: dead letters, stream | ARGV: dead letter entry id, group, has body, body
_REPLAY = """
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return 0 end
local m = fields(e[1][2])
local body = m['body'] or ''
if ARGV[3] == '1' then body = ARGV[4] end
add(KEYS[2], record(m['id'] or '', m['topic'] or '', body, ARGV[2]), 1)
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""

# KEYS: stream, delayed counts | ARGV: group
_LAG = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if pending.err then return -1 end
local delayed = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
return redis.call('XLEN', KEYS[1]) - pending[1] + delayed
"""


def _decode_frames(buf: bytes) -> list[Delivery]:
    """Parse the framed entries a script returned (see ``_LUA_LIB``)."""
    deliveries: list[Delivery] = []
    append = deliveries.append
    frame = _FRAME.unpack_from
    header = _RECORD.unpack_from
    pos, end = 0, len(buf)
    while pos < end:
        le, attempt = frame(buf, pos)
        a = pos + 8
        b = a + le
        li, lt, lb, lg = header(buf, b)
        c = b + 16
        d = c + li
        e = d + lt
        f = e + lb
        pos = f + lg
        target = buf[f:pos].decode() if lg else None
        append(
            Delivery(
                Message(buf[c:d].decode(), buf[d:e].decode(), buf[e:f], target), attempt, buf[a:b]
            )
        )
    return deliveries


def _decode_record(record: bytes) -> Message:
    li, lt, lb, lg = _RECORD.unpack_from(record)
    c = 16
    d = c + li
    e = d + lt
    f = e + lb
    target = record[f : f + lg].decode() if lg else None
    return Message(record[c:d].decode(), record[d:e].decode(), record[e:f], target)


def _decode_entry(eid: bytes, entry: dict[bytes, bytes]) -> Delivery:
    """One entry as redis-py parses an XREADGROUP reply (a first delivery: attempt as stored)."""
    return Delivery(_decode_record(entry.get(b"m", b"\0" * 16)), int(entry.get(b"a", b"1")), eid)


def _stream_id_key(eid: str) -> tuple[int, int]:
    ms, _, seq = eid.partition("-")
    return int(ms), int(seq)


# The transport ----------------------------------------------------------------------------------


class RedisTransport(Transport):
    """The transport contract on Redis Streams. See the module docstring for the key layout."""

    scheme = "redis"

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        ns = settings.namespace
        self._prefix = f"{{{ns}}}:"
        self._groups_key = f"{self._prefix}groups"
        self._delayed_key = f"{self._prefix}delayed"
        self._delayed_counts_key = f"{self._prefix}delayed:n"
        self._client: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._declared: dict[str, set[str]] = {}
        self._subscriptions: set[RedisSubscription] = set()
        self._must_redeclare = False

    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(RedisSettings.from_url(url))

    # keys

    def _stream(self, group: str) -> str:
        return f"{self._prefix}g:{group}"

    def _dlq(self, group: str) -> str:
        return f"{self._prefix}dlq:{group}"

    # connection

    async def connect(self) -> None:
        if self._client is not None:
            return
        client = Redis.from_pool(self._pool())
        self._client = client
        self._scripts = {
            name: client.register_script(_LUA_LIB + source if name != "lag" else source)
            for name, source in (
                ("declare", _DECLARE),
                ("publish", _PUBLISH),
                ("read", _READ),
                ("housekeep", _HOUSEKEEP),
                ("ack", _ACK),
                ("retry", _RETRY),
                ("dead_letter", _DEAD_LETTER),
                ("release", _RELEASE),
                ("replay", _REPLAY),
                ("lag", _LAG),
            )
        }
        try:
            info = await self._call(client.info, "connect", budget=self.settings.connect_timeout)
            version = str(info.get("redis_version", "0"))
            if tuple(int(p) for p in re.findall(r"\d+", version)[:2]) < (6, 2):
                raise ConfigurationError(f"the redis transport needs Redis >= 6.2, not {version}")
        except BaseException:
            self._client = None
            await client.aclose()
            raise

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
                return await op()
            except _REFUSED as exc:
                raise translate_error(exc) from exc
            except _RETRIED as exc:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("redis: %s failed (%s); retrying", what, exc)
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
                keys=[self._groups_key, self._stream(group)],
                args=[self._prefix, group, *sorted(topics)],
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
        known = self._declared.setdefault(group, set())
        known.update(topics)
        await self._script(
            "declare",
            [self._groups_key, self._stream(group)],
            [self._prefix, group, *sorted(topics)],
            "declare_group",
        )

    async def publish(self, messages: Sequence[Message]) -> None:
        self._redis()
        limit = self.max_message_bytes
        pack = _RECORD.pack
        chunks: list[bytes] = []
        parts: list[bytes] = []
        size = 0
        for m in messages:
            body = m.body
            if len(body) > limit:
                raise PayloadTooLarge(f"message {m.id} is {len(body)} bytes; the limit is {limit}")
            i = m.id.encode()
            t = m.topic.encode()
            g = check_group(m.group).encode() if m.group else b""
            parts += (pack(len(i), len(t), len(body), len(g)), i, t, body, g)
            size += len(body) + 64
            if size >= _PUBLISH_CHUNK_BYTES:
                chunks.append(b"".join(parts))
                parts, size = [], 0
        if parts:
            chunks.append(b"".join(parts))
        for chunk in chunks:
            await self._script("publish", [], [self._prefix, chunk], "publish")
        if chunks:
            await self._wait_replicas("publish")

    async def subscribe(
        self, group: str, topics: Collection[str], *, lease: float = 30.0
    ) -> RedisSubscription:
        if not lease > 0 or math.isinf(lease):
            raise ConfigurationError(f"lease must be a positive number of seconds, not {lease}")
        await self.declare_group(group, topics)
        sub = RedisSubscription(self, group, frozenset(topics), lease)
        self._subscriptions.add(sub)
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
        found: list[DeadLetter] = []
        for name, entries in zip(groups, replies, strict=True):
            for eid, f in entries:
                found.append(
                    DeadLetter(
                        id=f"{name}:{eid.decode()}",
                        group=name,
                        message=Message(
                            f.get(b"id", b"").decode(),
                            f.get(b"topic", b"").decode(),
                            f.get(b"body", b""),
                        ),
                        failure=Failure(
                            f.get(b"reason", b"").decode(),
                            f.get(b"error_type", b"").decode(),
                            f.get(b"error", b"").decode(),
                        ),
                        attempts=int(f.get(b"attempts", b"0")),
                        failed_at=float(f.get(b"failed_at", b"0")),
                    )
                )
        found.sort(key=lambda d: _stream_id_key(d.id.partition(":")[2]))
        return found[:limit]

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
        value = await self._script(
            "lag", [self._stream(group), self._delayed_counts_key], [group], "lag"
        )
        return None if value < 0 else int(value)


class RedisSubscription(Subscription):
    """One member: a consumer named ``<host>-<pid>-<random>~<lease ms>`` in the group."""

    def __init__(
        self, bus: RedisTransport, group: str, topics: frozenset[str], lease: float
    ) -> None:
        self._bus = bus
        self.group = group
        self.topics = topics
        self._lease_ms = max(1, math.ceil(lease * 1000))
        self._consumer = (
            f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}~{self._lease_ms}"
        )
        self._stream = bus._stream(group)
        self._held: dict[bytes, Delivery] = {}
        self._closed = False
        self._interval = min(bus.settings.housekeeping_interval, max(0.01, lease / 4))
        self._next_housekeeping = 0.0
        self._next_due: float | None = None
        self._max_block = bus.settings.socket_timeout / 2

    async def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        if self._closed:
            raise TransportError("subscription is closed")
        if max_messages <= 0:
            return []
        give_up = time.monotonic() + max(0.0, timeout)
        while True:
            got: list[Delivery] = []
            now = time.monotonic()
            if now >= self._next_housekeeping or (
                self._next_due is not None and now >= self._next_due
            ):
                got = await self._housekeep(max_messages)
            if len(got) < max_messages:
                got += await self._read(max_messages - len(got))
            if not got:
                now = time.monotonic()
                wait = min(give_up, self._next_housekeeping) - now
                if self._next_due is not None:
                    wait = min(wait, self._next_due - now)
                wait = min(wait, self._max_block)
                if wait > 0:
                    got = await self._read_blocking(wait)
                    if got and max_messages > 1:
                        got += await self._read(max_messages - 1)
            if got:
                return await self._hand_out(got)
            if time.monotonic() >= give_up or self._closed:
                return []

    async def _hand_out(self, got: list[Delivery]) -> list[Delivery]:
        if self._closed:  # closed while this read was in flight: give them back
            await self._give_back(got)
            return []
        held = self._held
        for delivery in got:
            held[delivery.handle] = delivery
        return got

    async def _read(self, count: int) -> list[Delivery]:
        blob = await self._bus._script(
            "read",
            [self._stream],
            [self.group, self._consumer, count, _READ_BUDGET_BYTES],
            "receive",
        )
        return _decode_frames(blob) if blob else []

    async def _read_blocking(self, wait: float) -> list[Delivery]:
        client = self._bus._redis()
        block_ms = max(1, math.ceil(wait * 1000))
        reply: Any = await self._bus._call(
            lambda: client.xreadgroup(
                self.group, self._consumer, {self._stream: ">"}, count=1, block=block_ms
            ),
            "receive",
        )
        if not reply:
            return []
        return [_decode_entry(eid, entry) for eid, entry in reply[0][1] if entry]

    async def _housekeep(self, want: int) -> list[Delivery]:
        bus = self._bus
        claim = min(want, _CLAIM_LIMIT)
        wait_us, blob = await bus._script(
            "housekeep",
            [self._stream, bus._delayed_key, bus._delayed_counts_key],
            [bus._prefix, self.group, self._consumer, self._lease_ms, claim, _REAP_IDLE_MS],
            "receive",
        )
        now = time.monotonic()
        wait = int(wait_us)
        self._next_due = None if wait < 0 else now + wait / 1e6
        claimed = _decode_frames(blob) if blob else []
        # More may be waiting when the pass was full: go again at once.
        self._next_housekeeping = now if len(claimed) >= claim else now + self._interval
        return claimed

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        handles = [d.handle for d in deliveries]
        for start in range(0, len(handles), _ACK_CHUNK):
            chunk = handles[start : start + _ACK_CHUNK]
            await self._bus._script("ack", [self._stream], [self.group, *chunk], "ack")
        held = self._held
        for handle in handles:
            held.pop(handle, None)

    async def retry(self, delivery: Delivery, delay: float) -> None:
        bus = self._bus
        delay_us = max(0, math.ceil(delay * 1_000_000))
        await bus._script(
            "retry",
            [self._stream, bus._delayed_key, bus._delayed_counts_key],
            [self.group, self._consumer, delivery.handle, delivery.attempt + 1, delay_us],
            "retry",
        )
        self._held.pop(delivery.handle, None)
        if delay_us:
            due = time.monotonic() + delay_us / 1e6
            self._next_due = due if self._next_due is None else min(self._next_due, due)
        await bus._wait_replicas("retry")

    async def dead_letter(self, delivery: Delivery, failure: Failure) -> None:
        bus = self._bus
        args = [self.group, self._consumer, delivery.handle, delivery.attempt]
        args += [failure.reason, failure.error_type, failure.error, repr(time.time())]
        await bus._script("dead_letter", [self._stream, bus._dlq(self.group)], args, "dead_letter")
        self._held.pop(delivery.handle, None)
        await bus._wait_replicas("dead_letter")

    async def _give_back(self, deliveries: Collection[Delivery]) -> None:
        """Put unsettled deliveries back at the end of the stream, attempt unchanged, and leave
        the consumer group. If Redis cannot be reached, their lease brings them back instead."""
        args: list[Any] = [self.group, self._consumer]
        for d in deliveries:
            args += (d.handle, d.attempt)
        try:
            await self._bus._script("release", [self._stream], args, "close", retry=False)
        except ChoreographError as exc:
            log.warning("redis: could not give back %d deliveries: %s", len(deliveries), exc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._bus._subscriptions.discard(self)
        held, self._held = self._held, {}
        if self._bus._client is not None:
            await self._give_back(held.values())
