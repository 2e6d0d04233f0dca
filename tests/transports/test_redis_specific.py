"""What the conformance suite cannot see of the redis:// transport: settings, error translation,
the key layout, attempts across leases and retries, and recovery from a Redis restart.

Most tests use the shared server on 127.0.0.1:6379 under a namespace of their own (deleted
afterwards); the restart tests start a private ``redis-server`` on a free port, so they never
disturb anyone else using the shared one.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_sync
from redis import exceptions as rx

from choreograph.errors import ConfigurationError, TransportError
from choreograph.transport import Delivery, Failure, Message, transport_from_url
from choreograph.transports.redis import (
    RedisSettings,
    RedisSubscription,
    RedisTransport,
    translate_error,
)
from tests.support.brokers import IN_CI, REDIS, wait_until

pytestmark = pytest.mark.redis

Factory = Callable[..., Awaitable[RedisTransport]]


def _message(topic: str, body: bytes | None = None, group: str | None = None) -> Message:
    event_id = uuid.uuid4().hex
    return Message(event_id, topic, body if body is not None else event_id.encode(), group)


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def _receive(sub: RedisSubscription, count: int, within: float) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + within
    while len(got) < count and (left := deadline - time.monotonic()) > 0:
        got += await sub.receive(count - len(got), min(left, 0.5))
    return got


async def _nothing_for(sub: RedisSubscription, seconds: float) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        got += await sub.receive(100, min(left, 0.5))
    return got


# Fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def shared_url(namespace: str) -> Iterator[str]:
    REDIS.require()
    yield f"redis://127.0.0.1:6379/0?namespace={namespace}"
    client = redis_sync.Redis(port=6379)
    keys = list(client.scan_iter(f"{{{namespace}}}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def raw(shared_url: str) -> Iterator[redis_sync.Redis]:
    client = redis_sync.Redis(port=6379)
    yield client
    client.close()


@pytest.fixture
async def make(shared_url: str) -> AsyncIterator[Factory]:
    """Connected transports on the test's namespace; options are added to the URL."""
    opened: list[RedisTransport] = []

    async def make(url: str | None = None, **options: object) -> RedisTransport:
        full = url or shared_url
        for key, value in options.items():
            full += f"&{key}={value}"
        transport = RedisTransport.from_url(full)
        await transport.connect()
        opened.append(transport)
        return transport

    yield make
    for transport in reversed(opened):
        await transport.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    """A redis-server of the test's own, to stop and start at will."""

    def __init__(self, directory: Path, *, persistent: bool, options: tuple[str, ...] = ()) -> None:
        self.port = _free_port()
        self.directory = directory
        self.persistent = persistent
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else []
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + (aof or ["--appendonly", "no"])
            + ["--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")]
            + list(self.options),
            stdout=subprocess.DEVNULL,
        )
        wait_until(self._answers, 20, f"redis-server on port {self.port}")

    def crash(self) -> None:
        """SIGKILL: no shutdown, no last save; only what was fsynced remains."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def _answers(self) -> bool:
        try:
            return bool(redis_sync.Redis(port=self.port, socket_timeout=0.5).ping())
        except rx.RedisError:
            return False

    def url(self, namespace: str) -> str:
        return f"redis://127.0.0.1:{self.port}/0?namespace={namespace}&reconnect_timeout=60"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., PrivateRedis]]:
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    servers: list[PrivateRedis] = []

    def start(persistent: bool, options: tuple[str, ...] = ()) -> PrivateRedis:
        server = PrivateRedis(tmp_path, persistent=persistent, options=options)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.crash()


# Settings ---------------------------------------------------------------------------------------


def test_settings_come_from_the_url_query() -> None:
    # given a URL with options
    url = (
        "redis://user:secret@redis.internal:6380/2?namespace=shop&reconnect_timeout=5"
        "&housekeeping_interval=0.25&max_connections=8&tls_verify=false&wait_replicas=1"
    )

    # when it is parsed
    settings = RedisSettings.from_url(url)

    # then each option is typed, and the rest keep their defaults
    assert settings.namespace == "shop"
    assert settings.reconnect_timeout == 5.0
    assert settings.housekeeping_interval == 0.25
    assert settings.max_connections == 8
    assert settings.tls_verify is False
    assert settings.wait_replicas == 1
    assert settings.socket_timeout == 10.0


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://localhost?colour=blue", "unknown option 'colour'"),
        ("redis://localhost?reconnect_timeout=soon", "expects float"),
        ("redis://localhost?reconnect_timeout=-1", "must be a positive number"),
        ("redis://localhost?housekeeping_interval=0", "must be a positive number"),
        ("redis://localhost?max_connections=0", "must be a positive number"),
        ("redis://localhost?wait_replicas=-1", "must not be negative"),
        ("redis://localhost?tls=maybe", "expects bool"),
        ("redis://localhost?namespace=a:b", "invalid group/service name"),
        ("redis://localhost:http/0", "the port must be a number"),
        ("redis://localhost/zero", "must be a number"),
        ("redis://localhost?password_env=NOT-A-NAME", "not a variable name"),
        ("http://localhost", "the scheme must be redis://"),
    ],
)
def test_invalid_settings_are_refused_with_a_clear_message(url: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        RedisSettings.from_url(url)


def test_messages_about_the_url_hide_the_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        RedisSettings.from_url("redis://app:hunter2@localhost/zero")
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "url", ["rediss://cache.example:6380/0", "redis://cache.example:6380/0?tls=true"]
)
def test_rediss_or_tls_option_selects_tls(url: str) -> None:
    # given a TLS URL (no connection is made)
    pool = RedisTransport.from_url(
        url + ("&" if "?" in url else "?") + "tls_ca_file=/ca.pem"
    )._pool()

    # then the connections are TLS ones, verifying the server against the given CA
    assert pool.connection_class.__name__ == "SSLConnection"
    assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
    assert pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"


def test_password_comes_from_the_named_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHOP_REDIS_PASSWORD", "from-env")
    pool = RedisTransport.from_url(
        "redis://app@localhost/0?password_env=SHOP_REDIS_PASSWORD"
    )._pool()
    assert pool.connection_kwargs["password"] == "from-env"

    monkeypatch.delenv("SHOP_REDIS_PASSWORD")
    with pytest.raises(ConfigurationError, match="SHOP_REDIS_PASSWORD"):
        RedisTransport.from_url("redis://localhost/0?password_env=SHOP_REDIS_PASSWORD")._pool()


def test_the_url_scheme_selects_this_transport() -> None:
    transport = transport_from_url("redis://127.0.0.1:6379/0?namespace=abc")
    assert isinstance(transport, RedisTransport)
    assert transport.settings.namespace == "abc"


# Error translation ------------------------------------------------------------------------------

ERROR_TABLE: list[tuple[rx.RedisError, type[Exception], str]] = [
    (rx.ConnectionError("Connection refused"), TransportError, "unreachable"),
    (rx.TimeoutError("Timeout reading from socket"), TransportError, "unreachable"),
    (rx.BusyLoadingError("LOADING"), TransportError, "still loading"),
    (rx.MaxConnectionsError("Too many connections"), TransportError, "unreachable"),
    (rx.ReadOnlyError("READONLY You can't write"), TransportError, "read-only replica"),
    (rx.OutOfMemoryError("OOM command not allowed"), TransportError, "out of memory"),
    (rx.ResponseError("ERR wrong number of arguments"), TransportError, "refused the operation"),
    (rx.NoScriptError("NOSCRIPT"), TransportError, "refused the operation"),
    (rx.DataError("Invalid input"), TransportError, "client error"),
    (rx.InvalidResponse("Protocol error"), TransportError, "client error"),
    (rx.AuthenticationError("invalid password"), ConfigurationError, "credentials"),
    (rx.AuthorizationError("NOPERM"), ConfigurationError, "lacks a permission"),
    (rx.NoPermissionError("NOPERM no permissions"), ConfigurationError, "lacks a permission"),
]


@pytest.mark.parametrize(("error", "expected", "fragment"), ERROR_TABLE)
def test_every_redis_error_maps_to_a_choreograph_error(
    error: rx.RedisError, expected: type[Exception], fragment: str
) -> None:
    translated = translate_error(error)
    assert type(translated) is expected
    assert fragment in str(translated)


def test_every_redis_error_class_translates_to_a_choreograph_error() -> None:
    # given every exception class redis-py defines (those the table names, and any other)
    def subclasses(cls: type[rx.RedisError]) -> set[type[rx.RedisError]]:
        found = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    classes = {c for c in subclasses(rx.RedisError) if c.__module__ == "redis.exceptions"}

    # then each becomes a TransportError, or a ConfigurationError for refused credentials/ACLs
    for cls in classes | {rx.RedisError}:
        translated = translate_error(cls("1 127.0.0.1:7000"))  # a shape every class accepts
        refused = issubclass(cls, (rx.AuthenticationError, rx.AuthorizationError))
        refused |= issubclass(cls, rx.NoPermissionError)
        assert type(translated) is (ConfigurationError if refused else TransportError), cls


@pytest.mark.parametrize(
    ("failures", "error", "raised", "calls"),
    [
        (2, rx.ConnectionError("reset"), None, 3),
        (2, rx.TimeoutError("slow"), None, 3),
        (2, rx.BusyLoadingError("LOADING"), None, 3),
        (2, rx.ReadOnlyError("READONLY"), None, 3),
        (99, rx.ConnectionError("refused"), TransportError, None),
        (1, rx.AuthenticationError("WRONGPASS"), ConfigurationError, 1),
        (1, rx.NoPermissionError("NOPERM"), ConfigurationError, 1),
        (1, rx.ResponseError("ERR syntax"), TransportError, 1),
        (1, rx.OutOfMemoryError("OOM"), TransportError, 1),
    ],
)
async def test_transient_errors_are_retried_and_the_others_raised_at_once(
    make: Factory,
    failures: int,
    error: rx.RedisError,
    raised: type[Exception] | None,
    calls: int | None,
) -> None:
    # given a transport that retries for at most 0.5 s, and an operation failing `failures` times
    bus = await make(reconnect_timeout=0.5)
    attempts = 0

    async def op() -> str:
        nonlocal attempts
        attempts += 1
        if attempts <= failures:
            raise error
        return "ok"

    # when it runs, then it succeeds after the retries, or raises the translated error (the
    # outer timeout only guards a hang)
    started = time.monotonic()
    async with asyncio.timeout(60):
        if raised is None:
            assert await bus._call(op, "test") == "ok"
        else:
            with pytest.raises(raised):
                await bus._call(op, "test")
    if calls is not None:
        assert attempts == calls
    else:  # it kept trying for its reconnect timeout
        assert time.monotonic() - started >= 0.4
        assert attempts > 1


async def test_unreachable_redis_fails_connect_within_its_timeout() -> None:
    # given nothing listening on a port
    bus = RedisTransport.from_url(f"redis://127.0.0.1:{_free_port()}/0?connect_timeout=0.5")

    # when connecting, then a TransportError comes (the outer timeout only guards a hang)
    async with asyncio.timeout(60):
        with pytest.raises(TransportError, match="did not answer"):
            await bus.connect()

    # and the transport refuses work until connected
    with pytest.raises(TransportError, match="not connected"):
        await bus.publish([_message("t")])


# Layout, fan-out, trimming ----------------------------------------------------------------------


async def test_publish_appends_to_the_stream_of_every_group_of_the_topic(
    make: Factory, raw: redis_sync.Redis, namespace: str
) -> None:
    # given three groups on a topic and one on another topic
    bus = await make()
    topic = _name("topic")
    groups = [_name("g") for _ in range(3)]
    for group in groups:
        await bus.declare_group(group, [topic])
    await bus.declare_group("elsewhere", [_name("other")])

    # when one message is published
    await bus.publish([_message(topic)])

    # then each group's stream holds it once, the other group's holds nothing
    assert [raw.xlen(f"{{{namespace}}}:g:{g}") for g in groups] == [1, 1, 1]
    assert raw.xlen(f"{{{namespace}}}:g:elsewhere") == 0
    # and every key lives under the namespace's hash tag
    assert all(
        key.startswith(f"{{{namespace}}}:".encode()) for key in raw.scan_iter("*" + namespace + "*")
    )


async def test_settled_entries_are_deleted_so_streams_do_not_grow(
    make: Factory, raw: redis_sync.Redis, namespace: str
) -> None:
    # given a member that received 300 messages
    bus = await make()
    group, topic = _name("g"), _name("topic")
    sub = await bus.subscribe(group, [topic])
    await bus.publish([_message(topic) for _ in range(300)])
    got = await _receive(sub, 300, within=5)
    stream = f"{{{namespace}}}:g:{group}"
    assert raw.xlen(stream) == 300

    # when it acks 200, retries 1 for later, dead-letters 1 and leaves 98 unsettled
    await sub.ack(got[:200])
    await sub.retry(got[200], 30)
    await sub.dead_letter(got[201], Failure("bad", "ValueError", "nope"))

    # then the stream keeps only the 98 unsettled entries; the others are where they went
    assert raw.xlen(stream) == 98
    assert raw.zcard(f"{{{namespace}}}:delayed") == 1
    assert raw.xlen(f"{{{namespace}}}:dlq:{group}") == 1
    assert raw.xpending(stream, group)["pending"] == 98


async def test_lag_counts_undelivered_and_delayed_but_not_leased(make: Factory) -> None:
    # given 5 messages for a group; a member receives 3, retries one for later and holds two
    bus = await make()
    group, topic = _name("g"), _name("topic")
    sub = await bus.subscribe(group, [topic])
    await bus.publish([_message(topic) for _ in range(5)])
    got = await _receive(sub, 3, within=5)
    await sub.retry(got[0], 30)

    # then lag is the 2 not yet delivered plus the 1 waiting to be retried
    assert await bus.lag(group) == 3
    # and an unknown group has no lag
    assert await bus.lag(_name("unknown")) is None


async def test_a_large_batch_is_sent_in_several_scripts_and_arrives_whole(make: Factory) -> None:
    # given 30 bodies of 400 KB (12 MB: more than one publish script, more than one read budget)
    bus = await make()
    group, topic = _name("g"), _name("topic")
    sub = await bus.subscribe(group, [topic])
    sent = [_message(topic, bytes([i]) * 400_000) for i in range(30)]

    # when published at once
    await bus.publish(sent)

    # then all arrive intact
    got = await _receive(sub, 30, within=10)
    assert sorted(d.message.body for d in got) == sorted(m.body for m in sent)
    await sub.ack(got)


async def test_thousands_of_expired_deliveries_are_taken_over_and_acked_at_once(
    make: Factory,
) -> None:
    # given member A holding 5,000 messages with a 0.2 s lease
    group, topic = _name("g"), _name("topic")
    a = await (await make()).subscribe(group, [topic], lease=0.2)
    await (await make()).publish([_message(topic) for _ in range(5000)])
    held = await _receive(a, 5000, within=10)
    assert len(held) == 5000

    # when member B receives up to 10,000 at a time after the lease ran out, and acks them
    b = await (await make()).subscribe(group, [topic], lease=60)
    await asyncio.sleep(0.3)
    got = await _receive(b, 5000, within=10)
    await b.ack(got)

    # then B got each once, as attempt 2, and nothing is left
    assert sorted(d.message.id for d in got) == sorted(d.message.id for d in held)
    assert {d.attempt for d in got} == {2}
    assert await (await make()).lag(group) == 0


async def test_an_oversized_message_is_buried_by_reference_and_the_rest_is_sent(
    make: Factory, raw: redis_sync.Redis, namespace: str
) -> None:
    # given a group, and a batch holding one message over the limit
    bus = await make()
    group, topic = _name("g"), _name("topic")
    await bus.declare_group(group, [topic])
    batch = [_message(topic), _message(topic, b"x" * (bus.max_message_bytes + 1))]
    # when it is published
    await bus.publish(batch)
    # then the small one is in the group's stream and the big one in its dead letters, small
    assert raw.xlen(f"{{{namespace}}}:g:{group}") == 1
    [(_, fields)] = raw.xrange(f"{{{namespace}}}:dlq:{group}")
    assert fields[b"id"] == batch[1].id.encode()
    assert fields[b"reason"] == b"payload too large"
    assert len(fields[b"body"]) < 8192


async def test_the_limit_follows_the_servers_proto_max_bulk_len(
    private_redis: Callable[..., PrivateRedis], namespace: str
) -> None:
    # given a server that accepts command arguments of 1 MiB at most
    server = private_redis(False, ("--proto-max-bulk-len", "1mb"))
    bus = RedisTransport.from_url(server.url(namespace))
    await bus.connect()
    try:
        # then the transport's limit leaves room under it
        assert bus.max_message_bytes == 1024 * 1024 // 2 - 64 * 1024
        group, topic = _name("g"), _name("topic")
        sub = await bus.subscribe(group, [topic])
        # when twenty bodies at the limit and one over it are published in one call
        fit = [_message(topic, bytes(bus.max_message_bytes)) for _ in range(20)]
        over = _message(topic, bytes(bus.max_message_bytes + 1))
        await bus.publish([*fit, over])
        # then every one that fits arrives (no script argument outgrew the server's limit)
        got = await _receive(sub, 20, within=20)
        assert {d.message.id for d in got} == {m.id for m in fit}
        # and dead-lettered with a long failure text, one is kept intact and replays intact
        await sub.dead_letter(got[0], Failure("handler error", "ValueError", "e" * 100_000))
        await sub.ack(got[1:])
        dead = {d.message.id: d for d in await bus.dead_letters(group)}
        assert dead[got[0].message.id].message.body == got[0].message.body
        assert dead[over.id].failure.reason == "payload too large"
        assert await bus.replay(dead[got[0].message.id].id)
        [again] = await _receive(sub, 1, within=10)
        assert again.message.body == got[0].message.body
    finally:
        await bus.close()


# Attempts and leases ----------------------------------------------------------------------------


async def test_attempt_counts_expired_leases_and_retries_alike(make: Factory) -> None:
    # given a member with a 0.3 s lease and one message
    bus = await make()
    group, topic = _name("g"), _name("topic")
    sub = await bus.subscribe(group, [topic], lease=0.3)
    await bus.publish([_message(topic)])
    attempts = []

    # when its lease runs out, it is retried at once, and its lease runs out again
    [first] = await _receive(sub, 1, within=5)
    attempts.append(first.attempt)
    [second] = await _receive(sub, 1, within=5)  # after the lease expired
    attempts.append(second.attempt)
    await sub.retry(second, 0)
    [third] = await _receive(sub, 1, within=5)
    attempts.append(third.attempt)
    [fourth] = await _receive(sub, 1, within=5)  # after the lease expired again
    attempts.append(fourth.attempt)
    await sub.ack([fourth])

    # then every redelivery counted one more attempt
    assert attempts == [1, 2, 3, 4]
    assert await _nothing_for(sub, 0.6) == []


async def test_the_holders_lease_decides_when_its_messages_come_back(make: Factory) -> None:
    # given member A (lease 60 s) holding one message and member B (lease 0.3 s)
    group, topic = _name("g"), _name("topic")
    a = await (await make()).subscribe(group, [topic], lease=60)
    b = await (await make()).subscribe(group, [topic], lease=0.3)
    await (await make()).publish([first := _message(topic)])
    assert len(await _receive(a, 1, within=5)) == 1

    # then B does not take A's message when B's own, shorter, lease would have expired
    assert await _nothing_for(b, 1.0) == []

    # and given B holds a message (0.3 s lease), A takes it once B's lease ran out, long
    # before A's own 60 s lease would have let it
    await (await make()).publish([second := _message(topic)])
    assert [d.message.id for d in await _receive(b, 1, within=5)] == [second.id]
    [taken] = await _receive(a, 1, within=30)
    assert taken.message.id == second.id != first.id
    assert taken.attempt == 2


async def test_close_gives_back_at_once_to_a_waiting_member(make: Factory) -> None:
    # given member A holding two messages, and member B waiting for messages
    group, topic = _name("g"), _name("topic")
    a = await (await make()).subscribe(group, [topic], lease=60)
    b = await (await make()).subscribe(group, [topic], lease=60)
    await (await make()).publish([_message(topic), _message(topic)])
    held = await _receive(a, 2, within=5)
    waiting = asyncio.create_task(_receive(b, 2, within=30))
    await asyncio.sleep(0.2)  # B is waiting (if not yet, it finds them when it looks)

    # when A closes
    await a.close()

    # then B gets them (long before the 60 s lease would have let it), with the same attempt
    got = await waiting
    assert sorted(d.message.id for d in got) == sorted(d.message.id for d in held)
    assert [d.attempt for d in got] == [1, 1]


async def test_a_closed_member_leaves_the_consumer_group(
    make: Factory, raw: redis_sync.Redis, namespace: str
) -> None:
    bus = await make()
    group, topic = _name("g"), _name("topic")
    sub = await bus.subscribe(group, [topic])
    await bus.publish([_message(topic)])
    assert len(await _receive(sub, 1, within=5)) == 1
    stream = f"{{{namespace}}}:g:{group}"
    assert len(raw.xinfo_consumers(stream, group)) == 1

    await sub.close()

    assert raw.xinfo_consumers(stream, group) == []
    assert await bus.lag(group) == 1  # the unsettled message went back
    with pytest.raises(TransportError, match="closed"):
        await sub.receive(1, 0)


async def test_a_member_that_lost_its_lease_cannot_retry_or_dead_letter(make: Factory) -> None:
    # given A held a message past its lease, and B took it over
    bus = await make()
    group, topic = _name("g"), _name("topic")
    a = await bus.subscribe(group, [topic], lease=0.3)
    b = await (await make()).subscribe(group, [topic], lease=60)
    await bus.publish([_message(topic)])
    [stale] = await _receive(a, 1, within=5)
    [current] = await _receive(b, 1, within=5)
    assert current.attempt == 2

    # when A, late, dead-letters it and retries it
    await a.dead_letter(stale, Failure("late", "RuntimeError", "too late"))
    await a.retry(stale, 0)

    # then neither happened: B still holds the only copy
    assert await bus.dead_letters(group) == []
    assert await _nothing_for(a, 0.5) == []
    await b.ack([current])
    assert await bus.lag(group) == 0


# Delayed retries --------------------------------------------------------------------------------


async def test_retries_come_back_in_due_order_and_never_early(make: Factory) -> None:
    # given three messages retried with delays 0.9, 0.3 and 0.6 s
    bus = await make()
    group, topic = _name("g"), _name("topic")
    sub = await bus.subscribe(group, [topic])
    await bus.publish([_message(topic) for _ in range(3)])
    got = await _receive(sub, 3, within=5)
    delays = dict(zip((d.message.id for d in got), (0.9, 0.3, 0.6), strict=True))
    started = time.monotonic()
    for delivery in got:
        await sub.retry(delivery, delays[delivery.message.id])

    # when they come back
    back: list[tuple[float, str]] = []
    while len(back) < 3 and time.monotonic() - started < 60:  # only guards a hang
        for delivery in await sub.receive(3, 0.5):
            back.append((time.monotonic() - started, delivery.message.id))
            await sub.ack([delivery])

    # then in order of their delays, none before its delay
    assert [delays[i] for _, i in back] == [0.3, 0.6, 0.9]
    assert all(at >= delays[i] - 0.01 for at, i in back), back


async def test_members_of_any_group_move_due_retries(
    make: Factory, raw: redis_sync.Redis, namespace: str
) -> None:
    # given group A retried a message for 0.3 s later, and no member of A runs any more
    bus = await make()
    topic = _name("topic")
    a = await bus.subscribe(_name("ga"), [topic])
    await bus.publish([_message(topic)])
    [delivery] = await _receive(a, 1, within=5)
    await a.retry(delivery, 0.3)
    await a.close()

    # when a member of another group is receiving
    other = await (await make()).subscribe(_name("gb"), [_name("other")])
    await _nothing_for(other, 1.0)

    # then the retry went back to A's stream, as attempt 2, waiting for A's next member
    assert raw.zcard(f"{{{namespace}}}:delayed") == 0
    assert await bus.lag(a.group) == 1
    again = await (await make()).subscribe(a.group, [topic])
    [back] = await _receive(again, 1, within=5)
    assert back.attempt == 2


# Recovery ---------------------------------------------------------------------------------------


async def test_groups_lost_by_redis_are_declared_again(
    make: Factory, raw: redis_sync.Redis, namespace: str
) -> None:
    # given a member, and then Redis losing every key (as a restart without persistence does)
    bus = await make()
    group, topic = _name("g"), _name("topic")
    sub = await bus.subscribe(group, [topic])
    raw.delete(*raw.scan_iter(f"{{{namespace}}}:*"))

    # when the member receives (NOGROUP) and the transport publishes again
    assert await sub.receive(10, 0.2) == []
    await bus.publish([sent := _message(topic)])

    # then the group was declared again and gets the new message
    [got] = await _receive(sub, 1, within=5)
    assert got.message.id == sent.id


@pytest.mark.slow
async def test_reconnects_after_redis_restarts_without_persistence(
    private_redis: Callable[[bool], PrivateRedis], namespace: str
) -> None:
    # given a member and a publisher on a Redis that keeps nothing on disk
    server = private_redis(False)
    bus = RedisTransport.from_url(server.url(namespace))
    await bus.connect()
    try:
        group, topic = _name("g"), _name("topic")
        sub = await bus.subscribe(group, [topic])
        await bus.publish([_message(topic)])
        await sub.ack(await _receive(sub, 1, within=5))

        # when Redis dies and comes back (empty), while the member is waiting
        waiting = asyncio.create_task(sub.receive(10, 2))
        await asyncio.sleep(0.2)
        server.crash()
        await asyncio.sleep(0.5)
        server.start()
        assert await waiting == []

        # then the transport reconnected, declared its group again, and works
        await bus.publish([sent := _message(topic)])
        [got] = await _receive(sub, 1, within=5)
        assert got.message.id == sent.id
    finally:
        await bus.close()


@pytest.mark.slow
async def test_with_aof_always_everything_survives_a_redis_crash(
    private_redis: Callable[[bool], PrivateRedis], namespace: str
) -> None:
    # given Redis with appendfsync always, a retry due in 1.5 s, 20 messages waiting, and one
    # message held by a member whose lease is 1 s
    server = private_redis(True)
    url = server.url(namespace)
    bus = RedisTransport.from_url(url)
    await bus.connect()
    group, topic = _name("g"), _name("topic")
    try:
        sub = await bus.subscribe(group, [topic], lease=1.0)
        await bus.publish([retried := _message(topic)])
        [delivery] = await _receive(sub, 1, within=5)
        await sub.retry(delivery, 1.5)
        retried_at = time.monotonic()
        await bus.publish([held := _message(topic)])
        assert [d.message.id for d in await _receive(sub, 1, within=5)] == [held.id]
        waiting = [_message(topic) for _ in range(20)]
        await bus.publish(waiting)

        # when Redis is killed (no shutdown) and started again
        server.crash()
    finally:
        await bus.close()  # cannot give the held message back: Redis is down
    server.start()

    # then a new member gets the 20, the held one after its lease, and the retry when due
    again = RedisTransport.from_url(url)
    await again.connect()
    try:
        sub = await again.subscribe(group, [topic], lease=30)
        got: dict[str, Delivery] = {}
        while len(got) < 22 and time.monotonic() - retried_at < 15:
            for d in await sub.receive(100, 0.5):
                got[d.message.id] = d
                if d.message.id == retried.id:
                    assert time.monotonic() - retried_at >= 1.5 - 0.05
                await sub.ack([d])
        assert set(got) == {m.id for m in [retried, held, *waiting]}
        assert got[retried.id].attempt == 2
        assert got[held.id].attempt == 2
    finally:
        await again.close()


@pytest.mark.slow
async def test_the_acl_user_of_the_docs_can_do_everything(
    private_redis: Callable[[bool], PrivateRedis], namespace: str
) -> None:
    # given the ACL user documented in docs/transport-redis.md, for this test's namespace
    doc = (Path(__file__).parents[2] / "docs" / "transport-redis.md").read_text()
    block = doc.split("ACL SETUSER ", 1)[1].split("```", 1)[0]
    rules = block.replace("${PASSWORD}", "s3cret").replace("{shop}", "{" + namespace + "}").split()
    server = private_redis(False)
    admin = redis_sync.Redis(port=server.port)
    admin.execute_command("ACL", "SETUSER", *rules)  # type: ignore[no-untyped-call]
    user = rules[0]

    # when a transport runs as that user through publish, receive, retry, dead-letter, replay, lag
    url = f"redis://{user}:s3cret@127.0.0.1:{server.port}/0?namespace={namespace}"
    bus = RedisTransport.from_url(url)
    await bus.connect()
    try:
        group, topic = _name("g"), _name("topic")
        sub = await bus.subscribe(group, [topic], lease=0.3)
        await bus.publish([_message(topic), _message(topic)])
        first, second = await _receive(sub, 2, within=5)
        await sub.ack([second])
        await sub.retry(first, 0.1)
        [retried] = await _receive(sub, 1, within=5)
        await sub.dead_letter(retried, Failure("x", "ValueError", "y"))
        [dead] = await bus.dead_letters(group)
        assert await bus.replay(dead.id)
        [replayed] = await _receive(sub, 1, within=5)
        [expired] = await _receive(sub, 1, within=5)  # taken over when its lease ran out
        await sub.ack([expired])
        assert (retried.attempt, replayed.attempt, expired.attempt) == (2, 1, 2)
        assert await bus.lag(group) == 0

        # then nothing was refused; and the same user cannot touch keys outside its namespace
        with pytest.raises(rx.NoPermissionError):
            redis_sync.Redis(port=server.port, username=user, password="s3cret").set("x", "1")
    finally:
        await bus.close()


async def test_wait_replicas_raises_when_too_few_replicas_confirm(make: Factory) -> None:
    # given a transport asking for one replica's confirmation, on a server with none
    bus = await make(wait_replicas=1, wait_timeout=0.1)
    topic = _name("topic")
    await bus.declare_group(_name("g"), [topic])

    # when publishing, then it says the publish is not as durable as asked
    with pytest.raises(TransportError, match="only 0 of 1 replicas"):
        await bus.publish([_message(topic)])
