"""What is particular to ``nats://``: settings, names, error translation, and the behaviour the
conformance suite cannot see (server restarts, delayed retries across them, leases shared by a
group's members, interest retention, the wire fast path).

Tests that restart a server start a private nats-server of their own (free port, temporary store)
and stop it by its process id: the shared server on 4222 is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats.errors as ne
import nats.js.errors as jse
import pytest

from choreograph.envelope import MAX_EVENT_BYTES
from choreograph.errors import (
    ChoreographError,
    ConfigurationError,
    PayloadTooLarge,
    TransportError,
)
from choreograph.transport import Delivery, Failure, Message, Subscription, transport_from_url
from choreograph.transports.nats import NatsSettings, NatsTransport
from choreograph.transports.nats._errors import ERROR_TABLE, is_transient, translate, translated
from choreograph.transports.nats._names import (
    Names,
    message_headers,
    message_id,
    parse_headers,
    token_topic,
    topic_token,
)
from tests.support.brokers import BROKERS, IN_CI

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"

# helpers -----------------------------------------------------------------------------------------


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def _msg(topic: str, body: bytes | None = None, *, group: str | None = None) -> Message:
    event_id = uuid.uuid4().hex
    return Message(event_id, topic, body if body is not None else event_id.encode(), group)


async def _receive_n(sub: Subscription, count: int, within: float) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + within
    while len(got) < count and (remaining := deadline - time.monotonic()) > 0:
        got += await sub.receive(min(500, count - len(got)), min(remaining, 0.5))
    return got


async def _receive_for(sub: Subscription, seconds: float) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        got += await sub.receive(100, min(remaining, 0.5))
    return got


async def _until(predicate: Callable[[], bool], within: float) -> None:
    for _ in range(int(within / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not true within {within} s")


async def _until_lag_at_most(bus: NatsTransport, group: str, most: int, within: float = 30) -> None:
    """Poll the group's lag until it is ``most`` or less (``within`` only guards a hang)."""
    for _ in range(int(within / 0.05)):
        if (await bus.lag(group) or 0) <= most:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"lag of {group} not down to {most} within {within} s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateServer:
    """A nats-server of this test alone, stopped and started by its process id."""

    def __init__(self, store: Path, *extra: str) -> None:
        self.port = _free_port()
        self.store = store
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-js"]
        self.process = subprocess.Popen(
            [*command, "-sd", str(self.store), *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"private nats-server on {self.port} did not start")

    def stop(self, sig: int = signal.SIGINT) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            process.wait(timeout=30)


def _require(path: str) -> None:
    if not Path(path).exists():
        message = f"{path} not found"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[PrivateServer]:
    _require(NATS_SERVER)
    server = PrivateServer(tmp_path / "jetstream")
    server.start()
    yield server
    server.stop(signal.SIGKILL)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[PrivateServer, Path]]:
    """A private server with TLS, its certificate signed by a throw-away CA; yields the CA file."""
    _require(NATS_SERVER)
    openssl = shutil.which("openssl") or "/usr/bin/openssl"
    _require(openssl)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=tmp_path, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=choreograph test CA",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    )
    server = PrivateServer(
        tmp_path / "jetstream",
        "--tls",
        "--tlscert",
        str(tmp_path / "server.pem"),
        "--tlskey",
        str(tmp_path / "server.key"),
    )
    server.start()
    yield server, tmp_path / "ca.pem"
    server.stop(signal.SIGKILL)


Opener = Callable[..., Awaitable[NatsTransport]]


@pytest.fixture
async def open_bus(namespace: str) -> AsyncIterator[Opener]:
    """Connected NatsTransports on the shared server (or ``server_url``), one namespace per test;
    keyword arguments become URL options."""
    opened: list[NatsTransport] = []

    async def open_(server_url: str | None = None, **options: object) -> NatsTransport:
        if server_url is None:
            BROKERS["nats"].require()
            server_url = "nats://127.0.0.1:4222"
        query = "&".join(
            f"{key}={value}" for key, value in {"namespace": namespace, **options}.items()
        )
        bus = transport_from_url(f"{server_url}?{query}")
        assert isinstance(bus, NatsTransport)
        await bus.connect()
        opened.append(bus)
        return bus

    yield open_
    # leave nothing behind on the server: this namespace's two streams (and their consumers)
    cleaners = {bus.settings.server_urls()[0]: bus for bus in opened if bus._client.is_open}
    for bus in cleaners.values():
        for stream in (bus._names.events, bus._names.dlq):
            with contextlib.suppress(ChoreographError, jse.APIError):
                await bus._client.api(f"STREAM.DELETE.{stream}")
    for bus in reversed(opened):
        await bus.close()


# settings ----------------------------------------------------------------------------------------


def test_settings_defaults_and_options_from_the_url() -> None:
    # given a URL with options, when parsed
    settings = NatsSettings.from_url(
        "nats://u:secret@h:4223?namespace=shop&ack_wait=12.5&replicas=3&storage=memory"
        "&ack_flush=false&servers=nats://h2:4222,nats://h3:4222"
    )

    # then each option is typed, the rest are defaults, and the servers list has them all
    assert settings.namespace == "shop"
    assert settings.ack_wait == 12.5
    assert settings.replicas == 3
    assert settings.storage == "memory"
    assert settings.ack_flush is False
    assert settings.retention == "interest"
    assert settings.max_deliver == -1
    assert settings.server_urls() == ["nats://u:secret@h:4223", "nats://h2:4222", "nats://h3:4222"]


def test_scheme_selects_the_nats_transport() -> None:
    bus = transport_from_url("nats://127.0.0.1:4222?namespace=abc")
    assert isinstance(bus, NatsTransport)
    assert bus.scheme == "nats"
    assert "secret" not in repr(transport_from_url("nats://u:secret@127.0.0.1:4222"))


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("storage=disk", "storage"),
        ("retention=workqueue", "retention"),
        ("replicas=0", "replicas"),
        ("replicas=many", "replicas"),
        ("ack_wait=0", "ack_wait"),
        ("publish_timeout=-1", "publish_timeout"),
        ("retry_margin=-0.5", "retry_margin"),
        ("max_deliver=0", "max_deliver"),
        ("max_ack_pending=-5", "max_ack_pending"),
        ("retention=limits", "max_age"),
        ("password_env=CHOREOGRAPH_SURELY_UNSET_VARIABLE", "CHOREOGRAPH_SURELY_UNSET_VARIABLE"),
        ("creds=/no/such/file.creds", "creds"),
        ("tls_cert_file=/etc/hostname", "tls_key_file"),
        ("namespace=has.dot", "namespace .has.dot."),
        ("bogus=1", "bogus"),
        ("ack_flush=maybe", "ack_flush"),
    ],
)
def test_invalid_settings_are_refused_with_a_clear_message(query: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        NatsSettings.from_url(f"nats://127.0.0.1:4222?{query}")


def test_a_url_of_another_scheme_or_port_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="nats://"):
        NatsSettings(url="redis://127.0.0.1:6379")
    with pytest.raises(ConfigurationError, match="port"):
        NatsSettings(url="nats://127.0.0.1:99999999")


def test_credentials_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_NATS_PASSWORD", "from-env")
    settings = NatsSettings.from_url("nats://alice@h:4222?password_env=TEST_NATS_PASSWORD")
    options = settings.connect_options()
    assert (options["user"], options["password"]) == ("alice", "from-env")


# names -------------------------------------------------------------------------------------------

TOPICS = [
    "PackageReady",
    "choreograph.HandlerFailed",
    "choreograph",
    "a.b",
    "a_2Eb",
    "a=2Eb",
    "a%2Eb",
    "with-dash_and_underscore",
    "prix-€",
    "spaces are odd",
    "*",
    ">",
    "~",
    "%",
    "=",
    "==",
    "",
    "x" * 300,
]


@pytest.mark.parametrize("topic", TOPICS)
def test_a_topic_is_one_safe_subject_token_and_comes_back_intact(topic: str) -> None:
    token = topic_token(topic)
    assert token
    assert not set(token) & set(". *>\t\r\n~%")
    assert token_topic(token) == topic


def test_topic_tokens_and_consumer_names_never_collide() -> None:
    tokens = {topic_token(t) for t in TOPICS}
    assert len(tokens) == len(TOPICS)
    names = Names("ns")
    consumers = {names.topic_consumer(g, t) for g in ("a", "a_b", "b") for t in TOPICS}
    consumers |= {names.group_consumer(g) for g in ("a", "a_b", "b")}
    assert len(consumers) == 3 * len(TOPICS) + 3
    assert all(len(c) <= 200 and "." not in c for c in consumers)


def test_subjects_of_the_namespace_parse_back() -> None:
    names = Names("ns")
    assert names.parse_subject(names.topic_subject("a.b")) == ("a.b", None)
    assert names.parse_subject(names.group_subject("grp", "a.b")) == ("a.b", "grp")


@pytest.mark.parametrize(
    "event_id",
    ["0f1e2d", "urn:uuid:1234", "with space inside", " leading", "line\nbreak", "é-unicode", ""],
)
def test_every_event_id_travels_in_headers_exactly(event_id: str) -> None:
    for group in (None, "grp"):
        headers = message_headers(Message(event_id, "T", b"", group))
        raw = b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        assert b"\n" not in raw.replace(b"\r\n", b"")
        assert message_id(parse_headers(raw + b"\r\n"), "fallback") == event_id


def test_targeted_messages_get_their_own_dedupe_key() -> None:
    plain = message_headers(Message("e1", "T", b""))
    first = message_headers(Message("e1", "T", b"", "grp"))
    second = message_headers(Message("e1", "T", b"", "grp"))
    assert plain["Nats-Msg-Id"] == "e1"
    assert len({plain["Nats-Msg-Id"], first["Nats-Msg-Id"], second["Nats-Msg-Id"]}) == 3


# error translation -------------------------------------------------------------------------------

ERROR_CASES: list[tuple[BaseException, type[ChoreographError], str]] = [
    (ne.AuthorizationError(), ConfigurationError, "credentials"),
    (ne.InvalidUserCredentialsError(), ConfigurationError, "credentials"),
    (ne.SecureConnRequiredError(), ConfigurationError, "TLS"),
    (ne.SecureConnWantedError(), ConfigurationError, "TLS"),
    (ssl.SSLCertVerificationError(), ConfigurationError, "TLS certificate"),
    (jse.ServiceUnavailableError(), TransportError, "JetStream did not answer"),
    (jse.NoStreamResponseError(), TransportError, "JetStream did not answer"),
    (ne.NoRespondersError(), TransportError, "JetStream did not answer"),
    (jse.NotFoundError(), TransportError, "not found"),
    (jse.BadRequestError(), TransportError, "refused the request"),
    (jse.ServerError(), TransportError, "refused the request"),
    (ne.NoServersError(), TransportError, "no NATS server"),
    (ne.ConnectionClosedError(), TransportError, "closed"),
    (ne.OutboundBufferLimitError(), TransportError, "buffer is full"),
    (ne.MaxPayloadError(), TransportError, "max_payload"),
    (ne.StaleConnectionError(), TransportError, "stale"),
    (ne.UnexpectedEOF(), TransportError, "stale"),
    (ne.TimeoutError(), TransportError, "in time"),
    (TimeoutError(), TransportError, "in time"),
    (ne.FlushTimeoutError(), TransportError, "in time"),
    (ne.ProtocolError(), TransportError, "client failed"),
    (ne.BadSubjectError(), TransportError, "client failed"),
    (ConnectionRefusedError(), TransportError, "network"),
    (OSError("boom"), TransportError, "network"),
]


@pytest.mark.parametrize(
    ("raised", "expected", "meaning"), ERROR_CASES, ids=[type(c[0]).__name__ for c in ERROR_CASES]
)
def test_each_client_error_is_translated(
    raised: BaseException, expected: type[ChoreographError], meaning: str
) -> None:
    # when a nats-py (or network) error escapes an operation
    with pytest.raises(ChoreographError) as caught, translated("doing it"):
        raise raised

    # then it surfaces as the expected choreograph error, saying what failed, chained
    assert type(caught.value) is expected
    assert meaning in str(caught.value)
    assert "doing it" in str(caught.value)
    assert caught.value.__cause__ is raised


def test_the_error_table_is_covered_by_the_cases() -> None:
    covered = {type(raised) for raised, _, _ in ERROR_CASES}
    for kinds, _, _ in ERROR_TABLE:
        assert any(issubclass(c, kinds) for c in covered), kinds


TRANSIENT_CASES: list[tuple[BaseException, bool]] = [
    (ne.TimeoutError(), True),
    (TimeoutError(), True),
    (ne.NoRespondersError(), True),
    (jse.ServiceUnavailableError(code=503, err_code=10008), True),
    (jse.ServerError(code=500, err_code=10009, description="cluster can not handle request"), True),
    (jse.BadRequestError(code=400, err_code=10005, description="no suitable peers"), True),
    (jse.ServerError(code=500, err_code=10007, description="not assigned"), True),
    (jse.APIError(code=503, err_code=10023, description="insufficient resources"), True),
    (ne.ConnectionReconnectingError(), True),
    (jse.NotFoundError(code=404, err_code=10014, description="consumer not found"), False),
    (jse.BadRequestError(code=400, err_code=10058, description="stream name in use"), False),
    (jse.ServerError(code=500, err_code=10012, description="consumer create failed"), False),
    (ne.ConnectionClosedError(), False),
    (ne.MaxPayloadError(), False),
    (ConnectionRefusedError(), False),
]


@pytest.mark.parametrize(
    ("raised", "transient"),
    TRANSIENT_CASES,
    ids=[f"{type(c[0]).__name__}-{getattr(c[0], 'err_code', '')}" for c in TRANSIENT_CASES],
)
def test_a_cluster_electing_or_missing_a_node_is_told_apart_from_a_refusal(
    raised: BaseException, transient: bool
) -> None:
    # given an error of a JetStream request, as raised or as translated by the transport
    translated_error = translate(raised, "a request")
    translated_error.__cause__ = raised
    # then only what passes once the cluster settles is retried
    assert is_transient(raised) is transient
    assert is_transient(translated_error) is transient


def test_choreograph_errors_and_others_pass_through() -> None:
    with pytest.raises(PayloadTooLarge), translated("x"):
        raise PayloadTooLarge("big")
    with pytest.raises(KeyError), translated("x"):
        raise KeyError("not a transport problem")
    assert isinstance(translate(RuntimeError("odd"), "x"), TransportError)


async def test_an_unreachable_server_is_a_transport_error() -> None:
    bus = transport_from_url(f"nats://127.0.0.1:{_free_port()}?connect_timeout=1")
    with pytest.raises(TransportError, match="no NATS server"):
        await bus.connect()


async def test_operations_before_connect_are_transport_errors() -> None:
    bus = transport_from_url("nats://127.0.0.1:4222")
    with pytest.raises(TransportError, match="not connected"):
        await bus.publish([_msg("T")])


# behaviour on the shared server ------------------------------------------------------------------


@pytest.mark.nats
async def test_topics_with_dots_and_unicode_reach_only_their_groups(open_bus: Opener) -> None:
    # given one group per topic, topics that differ only by characters subjects treat specially
    bus = await open_bus()
    topics = ["choreograph.HandlerFailed", "choreograph", "a.b", "a_2Eb", "prix-€", "*", ""]
    subs = {topic: await bus.subscribe(_unique("g"), [topic]) for topic in topics}

    # when a message of each topic is published
    sent = {topic: _msg(topic) for topic in topics}
    await bus.publish(list(sent.values()))

    # then each group receives exactly its own, under its topic
    for topic, sub in subs.items():
        got = await _receive_n(sub, 1, 5)
        got += await _receive_for(sub, 0.2)
        assert [(d.message.id, d.message.topic) for d in got] == [(sent[topic].id, topic)]


@pytest.mark.nats
async def test_odd_event_ids_come_back_exactly(open_bus: Opener) -> None:
    bus = await open_bus()
    group, topic = _unique("g"), _unique("t")
    sub = await bus.subscribe(group, [topic])
    odd = ["with space", "line\nbreak", "é", " padded ", "x" * 4000]
    await bus.publish([Message(i, topic, b"b") for i in odd])
    got = await _receive_n(sub, len(odd), 5)
    assert sorted(d.message.id for d in got) == sorted(odd)
    with pytest.raises(PayloadTooLarge, match="id"):
        await bus.publish([Message("y" * 5000, topic, b"b")])


@pytest.mark.nats
async def test_the_size_limit_follows_the_server(open_bus: Opener) -> None:
    bus = await open_bus()
    assert bus.max_message_bytes == min(MAX_EVENT_BYTES, bus._client.nc.max_payload - 64 * 1024)


@pytest.mark.nats
async def test_interest_retention_keeps_a_message_until_every_group_settled_it(
    open_bus: Opener,
) -> None:
    # given two groups on one topic and a message published
    bus = await open_bus()
    topic = _unique("t")
    a = await bus.subscribe(_unique("ga"), [topic])
    b = await bus.subscribe(_unique("gb"), [topic])
    await bus.publish([_msg(topic)])

    async def stored() -> int:
        info = await bus._client.api(f"STREAM.INFO.{bus._names.events}")
        return int(info["state"]["messages"])

    # when only A settles it, then it is still stored; when B dead-letters it, it is gone
    await a.ack(await _receive_n(a, 1, 5))
    assert await stored() == 1
    [held] = await _receive_n(b, 1, 5)
    await b.dead_letter(held, Failure("r", "E", "e"))
    for _ in range(60):
        if not await stored():
            break
        await asyncio.sleep(0.05)
    assert await stored() == 0

    # and a message of a topic no group declared is not stored at all
    await bus.publish([_msg(_unique("nobody"))])
    assert await stored() == 0


@pytest.mark.nats
async def test_limits_retention_keeps_settled_messages_until_max_age(open_bus: Opener) -> None:
    # given the limits retention with a max age shorter than the default duplicate window
    bus = await open_bus(retention="limits", max_age=30, dlq_max_age=10)
    group, topic = _unique("g"), _unique("t")
    sub = await bus.subscribe(group, [topic])

    # when a message is received and acked
    await bus.publish([_msg(topic)])
    await sub.ack(await _receive_n(sub, 1, 5))

    # then the stream still holds it, and its duplicate window was fitted to max_age
    info = await bus._client.api(f"STREAM.INFO.{bus._names.events}")
    assert info["state"]["messages"] == 1
    assert info["config"]["duplicate_window"] == 30 * 1_000_000_000
    assert await _receive_for(sub, 0.3) == []


@pytest.mark.nats
async def test_dead_letter_keeps_odd_error_texts_exactly(open_bus: Opener) -> None:
    bus = await open_bus()
    group, topic = _unique("g"), _unique("t")
    sub = await bus.subscribe(group, [topic])
    await bus.publish([_msg(topic)])
    [delivery] = await _receive_n(sub, 1, 5)
    failure = Failure("schema violation", "ValueError", 'line 1\r\nline 2: "é" \x00 end ')
    await sub.dead_letter(delivery, failure)
    [dead] = await bus.dead_letters(group)
    assert dead.failure == failure


@pytest.mark.nats
async def test_lag_counts_every_consumer_of_the_group_from_any_process(open_bus: Opener) -> None:
    # given a group on two topics, with 2 + 3 messages waiting
    bus = await open_bus()
    group, one, two = _unique("g"), _unique("t1"), _unique("t2")
    await bus.declare_group(group, [one, two])
    await bus.publish([_msg(one) for _ in range(2)] + [_msg(two) for _ in range(3)])

    # then the lag is 5, here and from another connection that never declared the group
    other = await open_bus()
    assert await bus.lag(group) == 5
    assert await other.lag(group) == 5
    assert await other.lag(_unique("unknown")) is None


@pytest.mark.nats
async def test_closing_gives_back_what_was_delivered_but_not_handed_over(open_bus: Opener) -> None:
    # given a member that received 1 of 50 messages waiting (more streamed into its buffer)
    bus = await open_bus()
    group, topic = _unique("g"), _unique("t")
    a = await bus.subscribe(group, [topic], lease=30)
    sent = [_msg(topic) for _ in range(50)]
    await bus.publish(sent)
    first = await a.receive(1, 5)
    assert len(first) == 1
    await _until_lag_at_most(bus, group, 48)  # more than the one handed over was streamed to it

    # when it closes, then another member gets all 50 at once, not after the 30 s lease
    await a.close()
    b = await (await open_bus()).subscribe(group, [topic], lease=30)
    got = await _receive_n(b, 50, 5)
    assert sorted(d.message.id for d in got) == sorted(m.id for m in sent)


@pytest.mark.nats
async def test_a_member_with_a_longer_lease_keeps_its_messages(open_bus: Opener) -> None:
    # given a group whose lease was lowered to 2 s by one member, and member A asking for 30 s
    group, topic = _unique("g"), _unique("t")
    short = await (await open_bus()).subscribe(group, [topic], lease=2)
    await short.close()
    bus = await open_bus()
    a = await bus.subscribe(group, [topic], lease=30)
    await bus.publish([_msg(topic)])
    held = await _receive_n(a, 1, 5)

    # when A holds it for 5 s (two and a half times the group's ack_wait)
    b = await (await open_bus()).subscribe(group, [topic], lease=30)
    assert await _receive_for(b, 5) == []

    # then it was never redelivered, and A can still ack it
    await a.ack(held)
    assert await _receive_for(b, 1.5) == []


@pytest.mark.nats
async def test_one_member_gets_a_topics_messages_in_publish_order(open_bus: Opener) -> None:
    # given one member, and 2,000 messages of one topic published in batches of 500
    bus = await open_bus()
    group, topic = _unique("g"), _unique("t")
    sub = await bus.subscribe(group, [topic])
    sent = [_msg(topic) for _ in range(2000)]
    for start in range(0, len(sent), 500):
        await bus.publish(sent[start : start + 500])

    # when it receives them in batches of various sizes (prefetching as it goes)
    got: list[Delivery] = []
    for size in [7, 500, 1, 333, 1000] * 10:
        batch = await sub.receive(size, 2)
        await sub.ack(batch)
        got += batch
        if len(got) >= len(sent):
            break

    # then they come in the order they were published
    assert [d.message.id for d in got] == [m.id for m in sent]


@pytest.mark.nats
async def test_a_topic_with_a_backlog_does_not_starve_the_others(open_bus: Opener) -> None:
    # given a member of a group on two topics, working through 3,000 messages of the first
    bus = await open_bus()
    group, busy, quiet = _unique("g"), _unique("busy"), _unique("quiet")
    sub = await bus.subscribe(group, [busy, quiet])
    await bus.publish([_msg(busy) for _ in range(3000)])
    await sub.ack(await sub.receive(100, 5))

    # when one message of the other topic comes
    lone = _msg(quiet)
    await bus.publish([lone])

    # then it is handed over while the backlog is still being worked through
    seen_busy = 0
    for _ in range(100):
        got = await sub.receive(100, 1)
        await sub.ack(got)
        if any(d.message.id == lone.id for d in got):
            break
        seen_busy += len(got)
    else:
        pytest.fail("the quiet topic's message never came")
    assert seen_busy < 2900


@pytest.mark.nats
async def test_the_public_client_path_behaves_like_the_fast_path(open_bus: Opener) -> None:
    # given a transport publishing and settling through nats-py's public publish()
    bus = await open_bus()
    bus._client.fast_wire = False
    group, topic = _unique("g"), _unique("t")
    sub = await bus.subscribe(group, [topic], lease=30)

    # when messages are published, acked, retried and dead-lettered
    sent = [_msg(topic) for _ in range(20)]
    await bus.publish(sent)
    got = await _receive_n(sub, 20, 5)
    await sub.ack(got[:18])
    await sub.retry(got[18], 0)
    await sub.dead_letter(got[19], Failure("r", "E", "e"))

    # then the same happens as on the fast path
    assert sorted(d.message.id for d in got) == sorted(m.id for m in sent)
    again = await _receive_n(sub, 1, 5)
    assert [(d.message.id, d.attempt) for d in again] == [(got[18].message.id, 2)]
    assert [d.message.id for d in await bus.dead_letters(group)] == [got[19].message.id]


@pytest.mark.nats
@pytest.mark.parametrize(
    ("margin", "delay", "sent"),
    [
        (0.0, 0.5, b'-NAK {"delay":500000000}'),
        (1.0, 0.5, b'-NAK {"delay":1000000000}'),
        (1.0, 1.5, b'-NAK {"delay":2500000000}'),
        (0.2, 1.5, b'-NAK {"delay":1700000000}'),
        (1.0, 0.0, b"-NAK"),
        (1.0, -1.0, b"-NAK"),
    ],
)
async def test_retry_margin_adds_at_most_the_delay_itself(
    open_bus: Opener, monkeypatch: pytest.MonkeyPatch, margin: float, delay: float, sent: bytes
) -> None:
    # given a delivery, and the settlements the transport sends recorded
    bus = await open_bus(retry_margin=margin)
    group, topic = _unique("g"), _unique("t")
    sub = await bus.subscribe(group, [topic], lease=30)
    await bus.publish([_msg(topic)])
    [delivery] = await _receive_n(sub, 1, 5)
    recorded: list[bytes] = []
    settle = bus._client.settle_confirmed

    async def record(subject: str, payload: bytes, doing: str) -> None:
        recorded.append(payload)
        await settle(subject, payload, doing)

    monkeypatch.setattr(bus._client, "settle_confirmed", record)

    # when it is retried, then the nak carries the delay plus min(margin, delay)
    await sub.retry(delivery, delay)
    assert recorded == [sent]


@pytest.mark.nats
async def test_a_retry_comes_back_after_its_delay_and_margin(open_bus: Opener) -> None:
    bus = await open_bus(retry_margin=0.4)
    group, topic = _unique("g"), _unique("t")
    sub = await bus.subscribe(group, [topic], lease=30)
    await bus.publish([_msg(topic)])
    [delivery] = await _receive_n(sub, 1, 5)
    await sub.retry(delivery, 0.5)
    start = time.monotonic()
    [again] = await _receive_n(sub, 1, 5)
    assert time.monotonic() - start >= 0.9 - 0.05
    assert again.attempt == 2


@pytest.mark.nats
async def test_a_stream_of_another_shape_is_a_configuration_error(
    open_bus: Opener, namespace: str
) -> None:
    bus = await open_bus()
    await bus._client.api(f"STREAM.DELETE.{namespace}_dlq")
    await bus._client.api(
        f"STREAM.CREATE.{namespace}_dlq",
        {"name": f"{namespace}_dlq", "subjects": ["elsewhere.>"], "storage": "memory"},
    )
    with pytest.raises(ConfigurationError, match="another configuration"):
        await open_bus()
    await bus._client.api(f"STREAM.DELETE.{namespace}_dlq")


# private servers: TLS, restarts -------------------------------------------------------------------


@pytest.mark.nats
async def test_tls_with_the_servers_ca_works_and_an_unknown_ca_is_refused_quickly(
    tls_server: tuple[PrivateServer, Path], open_bus: Opener
) -> None:
    server, ca_file = tls_server

    # given the CA on the URL, when connecting, then publishing and receiving work over TLS
    bus = await open_bus(server.url, tls="true", tls_ca_file=str(ca_file))
    group, topic = _unique("g"), _unique("t")
    sub = await bus.subscribe(group, [topic])
    sent = _msg(topic)
    await bus.publish([sent])
    assert [d.message.id for d in await _receive_n(sub, 1, 5)] == [sent.id]

    # and without it, connecting fails (without retrying forever; the outer timeout only guards
    # a hang) with a ConfigurationError that says why
    async with asyncio.timeout(60):
        with pytest.raises(ConfigurationError, match="TLS certificate"):
            await open_bus(server.url, connect_timeout=1)


@pytest.mark.nats
@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["graceful", "crash"])
async def test_a_pending_retry_survives_a_server_restart_and_is_never_early(
    private_server: PrivateServer, open_bus: Opener, stop: int
) -> None:
    # given a retry scheduled 3 s later
    bus = await open_bus(private_server.url)
    group, topic, delay = _unique("g"), _unique("t"), 3.0
    sub = await bus.subscribe(group, [topic], lease=30)
    sent = _msg(topic)
    await bus.publish([sent])
    [delivery] = await _receive_n(sub, 1, 5)
    await sub.retry(delivery, delay)
    retried_at = time.monotonic()

    # when the server stops (gracefully or killed) and starts again meanwhile
    await asyncio.sleep(0.5)
    await asyncio.to_thread(private_server.stop, stop)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(private_server.start)

    # then the retry is not delivered before its delay, and is delivered after it, attempt 2
    got: list[Delivery] = []
    while not got and time.monotonic() - retried_at < delay + 15:
        got = await sub.receive(10, 0.2)
    assert [d.message.id for d in got] == [sent.id]
    assert time.monotonic() - retried_at >= delay
    assert got[0].attempt == 2
    await sub.ack(got)


@pytest.mark.nats
@pytest.mark.slow
async def test_every_confirmed_publish_survives_a_private_server_restart(
    private_server: PrivateServer, open_bus: Opener
) -> None:
    # given a member and a publisher publishing small batches in a loop
    bus = await open_bus(private_server.url, publish_timeout=20)
    group, topic = _unique("g"), _unique("t")
    sub = await bus.subscribe(group, [topic], lease=30)
    confirmed: list[str] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def publish_forever() -> None:
        while not stop.is_set():
            batch = [_msg(topic) for _ in range(5)]
            try:
                await bus.publish(batch)
            except TransportError as exc:
                failures.append(str(exc))
                continue
            confirmed.extend(m.id for m in batch)
            await asyncio.sleep(0.005)

    publisher = asyncio.create_task(publish_forever())
    try:
        await _until(lambda: len(confirmed) >= 100, 20)
        # when the server is killed and started again while publishing goes on
        await asyncio.to_thread(private_server.stop, signal.SIGKILL)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(private_server.start)
        restarted_at = len(confirmed)
        await _until(lambda: len(confirmed) >= restarted_at + 100, 30)
    finally:
        stop.set()
        await publisher

    # then publishing never failed (it waited for the server), and the member gets everything
    assert failures == []
    received: set[str] = set()
    deadline = time.monotonic() + 30
    while not set(confirmed) <= received and time.monotonic() < deadline:
        got = await sub.receive(500, 0.5)
        received.update(d.message.id for d in got)
        await sub.ack(got)
    assert set(confirmed) - received == set()


@pytest.mark.nats
@pytest.mark.slow
async def test_a_publish_gives_up_with_transport_error_when_the_server_stays_away(
    private_server: PrivateServer, open_bus: Opener
) -> None:
    # given a transport with a 1 s publish timeout (and API retry timeout), and its server gone
    bus = await open_bus(private_server.url, publish_timeout=1, api_retry_timeout=1)
    await bus.declare_group(_unique("g"), ["T"])
    await asyncio.to_thread(private_server.stop, signal.SIGKILL)

    # when publishing, then TransportError comes once the timeout has passed, not before (the
    # outer timeout only guards a hang)
    start = time.monotonic()
    async with asyncio.timeout(60):
        with pytest.raises(TransportError, match=r"not connected|not confirmed"):
            await bus.publish([_msg("T")])
    assert time.monotonic() - start >= 0.9
