"""What the conformance suite cannot see of ``amqp://``: settings, the error table, the frames we
marshal ourselves, the retry ladder, exact attempts, multiple-acks, idle members, and outages
(simulated with a TCP proxy that we cut, so the shared server keeps running)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection

import aiormq
import aiormq.exceptions as amqp_errors
import pamqp.frame
import pytest
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from choreograph.errors import ChoreographError, ConfigurationError, PayloadTooLarge, TransportError
from choreograph.transport import Delivery, Failure, Message, transport_from_url
from choreograph.transports.rabbitmq import (
    ATTEMPT,
    DELAY_LEVELS,
    ERROR_TABLE,
    RabbitMQSettings,
    RabbitMQSubscription,
    RabbitMQTransport,
    translate,
)
from choreograph.transports.rabbitmq._frames import Out as _Out
from choreograph.transports.rabbitmq._frames import content_header as _header
from tests.support.brokers import RABBITMQ
from tests.support.commands import require_command

BASE = "amqp://guest:guest@127.0.0.1:5672/"


# Settings ---------------------------------------------------------------------------------------


def test_settings_defaults_and_typed_options() -> None:
    # given a URL with options, when it is parsed
    s = RabbitMQSettings.from_url(BASE + "?namespace=shop&prefetch=50&publish_timeout=2.5")

    # then the options are typed and the rest keep their defaults
    assert (s.namespace, s.prefetch, s.publish_timeout) == ("shop", 50, 2.5)
    assert (s.publish_window, s.heartbeat, s.dlq_max_age) == (1000, 30, "")
    assert s.vhost == "/"
    assert s.client_url() == BASE + "?heartbeat=30"
    assert s.ssl_context() is None


@pytest.mark.parametrize(
    ("url", "vhost"),
    [
        ("amqp://h", "/"),
        ("amqp://h/", "/"),
        ("amqp://h/%2F", "/"),
        ("amqp://h/prod", "prod"),
        ("amqp://h:5673/team%2Fa", "team/a"),
    ],
)
def test_vhost_comes_from_the_path(url: str, vhost: str) -> None:
    assert RabbitMQSettings.from_url(url).vhost == vhost


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("amqp://h/?prefetch=0", "prefetch"),
        ("amqp://h/?prefetch=many", "prefetch"),
        ("amqp://h/?nope=1", "unknown option 'nope'"),
        ("amqp://h/?namespace=a.b", "invalid group/service name"),
        ("amqp://h/?publish_timeout=0", "publish_timeout"),
        ("amqp://h/?heartbeat=-1", "heartbeat"),
        ("amqp://h/?dlq_max_age=forever", "dlq_max_age"),
        ("amqp://h/?cafile=/ca.pem", "amqps://"),
        ("amqps://h/?keyfile=/k.pem", "keyfile needs certfile"),
        ("amqp:///", "needs a host"),
        ("amqp://h:99999/", "port"),
        ("amqp://h/a/b", "%2F"),
        ("http://h/", "amqp://"),
    ],
)
def test_invalid_settings_are_refused_clearly(url: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        RabbitMQSettings.from_url(url)


def test_error_messages_never_show_the_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        RabbitMQSettings.from_url("amqp://app:s3cret@h/?prefetch=0")
    assert "s3cret" not in str(caught.value)
    assert "app:***@h" in str(caught.value)


def test_amqps_builds_a_verifying_tls_context() -> None:
    # the transport's own from_url (transport_from_url knows only amqp://, see the docs)
    bus = RabbitMQTransport.from_url("amqps://u:p@broker.example:5671/prod?namespace=x")
    context = bus.settings.ssl_context()
    assert context is not None
    assert context.check_hostname


def test_amqp_urls_choose_this_transport() -> None:
    assert isinstance(transport_from_url(BASE + "?namespace=x"), RabbitMQTransport)


# Errors -----------------------------------------------------------------------------------------

ERROR_CASES: list[tuple[BaseException, type[ChoreographError], str]] = [
    (amqp_errors.ProbableAuthenticationError("bad"), ConfigurationError, "authentication"),
    (amqp_errors.AuthenticationError("PLAIN"), ConfigurationError, "authentication"),
    (amqp_errors.IncompatibleProtocolError("HTTP/1.1"), ConfigurationError, "AMQP 0-9-1"),
    (amqp_errors.ConnectionNotAllowed("vhost x not found"), ConfigurationError, "vhost"),
    (amqp_errors.ChannelAccessRefused("no rights"), ConfigurationError, "access refused"),
    (amqp_errors.ChannelPreconditionFailed("x-queue-type"), ConfigurationError, "other arguments"),
    (amqp_errors.ChannelNotFoundEntity("no queue"), TransportError, "not found"),
    (amqp_errors.ChannelLockedResource("exclusive"), TransportError, "locked"),
    (
        amqp_errors.PublishError(
            DeliveredMessage(spec.Basic.Return(312, "NO_ROUTE"), ContentHeader(), b"", None),  # type: ignore[arg-type]
            spec.Basic.Return(),
        ),
        TransportError,
        "unroutable",
    ),
    (amqp_errors.DeliveryError(None, spec.Basic.Nack()), TransportError, "negative confirm"),
    (amqp_errors.ConnectionClosed(320, "CONNECTION_FORCED"), TransportError, "connection lost"),
    (amqp_errors.AMQPConnectionError("refused"), TransportError, "connection lost"),
    (amqp_errors.ChannelClosed(504, "gone"), TransportError, "AMQP error"),
    (amqp_errors.InvalidFrameError("?"), TransportError, "AMQP error"),
    (amqp_errors.ChannelInvalidStateError("closed"), TransportError, "channel closed"),
    (TimeoutError(), TransportError, "timed out"),
    (ConnectionRefusedError(111, "refused"), TransportError, "network error"),
    (RuntimeError("connection closed"), TransportError, "RuntimeError"),
]


@pytest.mark.parametrize(("error", "expected", "words"), ERROR_CASES, ids=lambda v: repr(v)[:40])
def test_client_errors_become_choreograph_errors(
    error: BaseException, expected: type[ChoreographError], words: str
) -> None:
    translated = translate(error, "doing it")
    assert type(translated) is expected
    assert words in str(translated)
    assert "doing it" in str(translated)


def test_every_row_of_the_error_table_is_tested_and_none_is_shadowed() -> None:
    tested = {type(error) for error, _, _ in ERROR_CASES}
    for kind, _, _ in ERROR_TABLE:
        assert any(issubclass(t, kind) for t in tested), kind
    for i, (earlier, _, _) in enumerate(ERROR_TABLE):
        for later, _, _ in ERROR_TABLE[i + 1 :]:
            assert not issubclass(later, earlier), f"{later} is shadowed by {earlier}"


def test_choreograph_errors_pass_through() -> None:
    error = PayloadTooLarge("big")
    assert translate(error, "x") is error


# Frames -----------------------------------------------------------------------------------------


def _pamqp_frames(
    channel: int, frame_max: int, out: _Out, properties: spec.Basic.Properties, mandatory: bool
) -> bytes:
    method = spec.Basic.Publish(
        exchange=out.exchange, routing_key=out.routing_key, mandatory=mandatory
    )
    frames: list[spec.Basic.Publish | ContentHeader | ContentBody]
    frames = [method, ContentHeader(0, len(out.body), properties)]
    step = frame_max - 8
    frames += [ContentBody(out.body[i : i + step]) for i in range(0, len(out.body), step)]
    return b"".join(pamqp.frame.marshal(f, channel) for f in frames)


def _decoded(stream: bytes) -> list[tuple[object, ...]]:
    """Split a byte stream into frames with pamqp, the reference AMQP codec."""
    frames: list[tuple[object, ...]] = []
    while stream:
        used, channel, frame = pamqp.frame.unmarshal(stream)
        stream = stream[used:]
        if isinstance(frame, spec.Basic.Publish):
            frames.append((channel, frame.exchange, frame.routing_key, frame.mandatory))
        elif isinstance(frame, ContentHeader):
            frames.append((channel, frame.body_size, sorted(dict(frame.properties).items())))
        else:
            assert isinstance(frame, ContentBody)
            frames.append((channel, frame.value))
    return frames


@pytest.mark.parametrize(
    ("body", "attempt", "mandatory"),
    [
        (b'{"a": 1}', 1, False),
        (b"", 1, True),
        (bytes(range(256)) * 1200, 1, False),  # 307 KB: three body frames
        (b"x" * 10, 7, True),
        (b"x" * 10, 100_000, False),
    ],
)
def test_our_frames_are_what_the_reference_codec_marshals(
    body: bytes, attempt: int, mandatory: bool
) -> None:
    # given a message with a non-ASCII id and topic
    message_id, topic = "id-é-42", "order.placé"
    out = _Out("ns.events", topic, _header(message_id, topic, len(body), attempt), body, message_id)
    properties = spec.Basic.Properties(
        delivery_mode=2,
        message_id=message_id,
        message_type=topic,
        headers={ATTEMPT: attempt} if attempt != 1 else None,
    )

    # when both are marshalled for channel 3, frame_max 131072
    ours = out.frames(3, 131_072 - 8, mandatory)
    reference = _pamqp_frames(3, 131_072, out, properties, mandatory)

    # then they decode the same (and are the same bytes when there is no header table, where
    # pamqp would pick a narrower integer type than our fixed 32 bits)
    assert _decoded(ours) == _decoded(reference)
    if attempt == 1:
        assert ours == reference


def test_names_over_255_bytes_are_refused_before_anything_is_sent() -> None:
    with pytest.raises(ConfigurationError, match="255"):
        _header("x" * 256, "topic", 0)


# The retry ladder -------------------------------------------------------------------------------


def _ladder_delay_ms(key: str) -> int:
    """Follow a routing key down the ladder as the broker would: the TTLs it waits, summed."""
    bits = key.split(".")[:DELAY_LEVELS]
    return sum(1 << (DELAY_LEVELS - 1 - i) for i, bit in enumerate(bits) if bit == "1")


@pytest.mark.parametrize("delay", [0.0001, 0.001, 0.2, 0.3, 1.0, 1.3, 30.0, 86_400.0 * 40])
def test_retry_delays_round_up_to_the_millisecond_and_are_never_early(delay: float) -> None:
    bus = RabbitMQTransport.from_url(BASE + "?namespace=ns")
    exchange, key, top = bus.retry_route("billing", delay)
    waited = _ladder_delay_ms(key)
    assert waited >= delay * 1000
    assert waited - delay * 1000 < 1
    assert key.endswith(".billing")
    assert exchange == f"ns.delay.{top}"
    assert top == waited.bit_length() - 1


def test_no_delay_goes_straight_to_the_group_and_too_long_a_delay_is_refused() -> None:
    bus = RabbitMQTransport.from_url(BASE + "?namespace=ns")
    assert bus.retry_route("billing", 0) == ("ns.groups", "billing", -1)
    with pytest.raises(ConfigurationError, match=r"49\.7 days"):
        bus.retry_route("billing", 50 * 86_400.0)


# On the broker ----------------------------------------------------------------------------------

pytestmark_broker = pytest.mark.rabbitmq


class Proxy:
    """A TCP proxy in front of RabbitMQ that a test can cut (the broker sees the connection drop,
    the client sees EOF) and restore, without touching the shared server."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5672)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


Opener = Callable[..., Awaitable[RabbitMQTransport]]


@pytest.fixture
async def amqp() -> AsyncIterator[tuple[str, Opener]]:
    """``(namespace, open)``: ``open(**options)`` connects a new transport on a namespace unique
    to the test; everything the test created on the broker is deleted afterwards."""
    RABBITMQ.require()
    ns = "rq" + uuid.uuid4().hex[:10]
    opened: list[RabbitMQTransport] = []
    # every group declared, kept here: a transport forgets its own when it reconnects
    groups: set[str] = set()

    async def open_(port: int = 5672, **options: object) -> RabbitMQTransport:
        query = "&".join(f"{k}={v}" for k, v in {"namespace": ns, **options}.items())
        bus = RabbitMQTransport.from_url(f"amqp://guest:guest@127.0.0.1:{port}/?{query}")
        declare = bus.declare_group

        async def declare_group(group: str, topics: Collection[str]) -> None:
            groups.add(group)
            await declare(group, topics)

        bus.declare_group = declare_group  # type: ignore[method-assign]
        await bus.connect()
        opened.append(bus)
        return bus

    yield ns, open_
    for bus in opened:
        await bus.close()
    cleaner = RabbitMQTransport.from_url(f"{BASE}?namespace={ns}")
    await cleaner.connect()
    await cleaner.delete_namespace(groups)
    await cleaner.close()


def _messages(topic: str, count: int) -> list[Message]:
    return [Message(uuid.uuid4().hex, topic, f"body {i}".encode()) for i in range(count)]


async def _receive(sub: RabbitMQSubscription, count: int, within: float = 5.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + within
    while len(got) < count and time.monotonic() < deadline:
        got += await sub.receive(count - len(got), 0.2)
    return got


def _ids(deliveries: list[Delivery]) -> set[str]:
    return {d.message.id for d in deliveries}


@pytestmark_broker
async def test_retries_wait_their_exact_delay_through_the_ladder(
    amqp: tuple[str, Opener],
) -> None:
    # given a member holding four messages
    _, open_ = amqp
    bus = await open_()
    sub = await bus.subscribe("g", ["t"], lease=30)
    sent = _messages("t", 4)
    await bus.publish(sent)
    held = await _receive(sub, 4)
    delays = dict(zip(sorted(_ids(held)), [0.0, 0.05, 0.7, 1.3], strict=True))

    # when each is retried with its own delay (1.3 s = 1300 ms visits five rungs)
    start = time.monotonic()
    for delivery in held:
        await sub.retry(delivery, delays[delivery.message.id])

    # then each comes back not before its delay, and in the order of delays set well apart
    # (the loop's limit only guards a hang; how soon after its delay is a benchmark figure)
    arrived: dict[str, float] = {}
    while len(arrived) < 4 and time.monotonic() - start < 60:
        for delivery in await sub.receive(10, 0.05):
            arrived[delivery.message.id] = time.monotonic() - start
            assert delivery.attempt == 2
            await sub.ack([delivery])
    assert set(arrived) == set(delays)
    for message_id, delay in delays.items():
        assert arrived[message_id] >= delay, (delay, arrived[message_id])
    by_delay = sorted(delays, key=delays.__getitem__)
    for earlier, later in itertools.pairwise(by_delay):
        if delays[later] - delays[earlier] >= 0.5:
            assert arrived[earlier] < arrived[later], (delays[earlier], delays[later], arrived)


@pytestmark_broker
async def test_the_ladder_accepts_its_longest_rung(amqp: tuple[str, Opener]) -> None:
    # a 2**31 ms TTL is the largest the ladder uses; the broker must accept the declaration
    _, open_ = amqp
    bus = await open_()
    await bus._declare_delays(DELAY_LEVELS - 1)
    assert bus._delay_top == DELAY_LEVELS - 1


@pytestmark_broker
async def test_attempt_counts_retries_lost_connections_and_lease_expiries(
    amqp: tuple[str, Opener],
) -> None:
    # given a member connected through a proxy we can cut
    _, open_ = amqp
    proxy = Proxy()
    await proxy.start()
    flaky = await open_(port=proxy.port)
    steady = await open_()
    first = await flaky.subscribe("g", ["t"], lease=30)
    [sent] = _messages("t", 1)
    await steady.publish([sent])
    [one] = await _receive(first, 1)
    assert one.attempt == 1

    # when its connection drops while it holds the message
    await proxy.cut()

    # then another member gets it as attempt 2; it retries it: attempt 3
    second = await steady.subscribe("g", ["t"], lease=1.0)
    [two] = await _receive(second, 1)
    assert (two.message.id, two.attempt) == (sent.id, 2)
    await second.retry(two, 0.05)
    [three] = await _receive(second, 1)
    assert three.attempt == 3

    # and when it lets the lease run out, attempt 4 (the header and the broker's count add up)
    [four] = await _receive(second, 1, within=6)
    assert (four.message.id, four.attempt) == (sent.id, 4)
    await second.ack([four])
    # settling a delivery whose lease ran out is a no-op, not an error
    await second.ack([three])
    await second.retry(three, 0)
    assert await _receive(second, 1, within=1.5) == []


@pytestmark_broker
async def test_a_member_resumes_after_its_connection_drops_and_stale_acks_are_harmless(
    amqp: tuple[str, Opener],
) -> None:
    # given a member and a publisher, both through a proxy we can cut
    _, open_ = amqp
    proxy = Proxy()
    await proxy.start()
    bus = await open_(port=proxy.port, publish_timeout=20)
    sub = await bus.subscribe("g", ["t"], lease=30)
    before = _messages("t", 3)
    await bus.publish(before)
    stale = await _receive(sub, 3)

    # when the connection drops, and comes back a second later
    await proxy.cut()
    restore = asyncio.get_running_loop().call_later(
        1.0, lambda: asyncio.ensure_future(proxy.start())
    )
    after = _messages("t", 3)
    await bus.publish(after)  # waits for the reconnection, then confirms

    # then acking what was held on the old connection does nothing, and the member receives both
    # the new messages and the old ones again (at-least-once), with a higher attempt for the old
    await sub.ack(stale)
    got = await _receive(sub, 6, within=15)
    assert _ids(got) == _ids(stale) | {m.id for m in after}
    assert {d.attempt for d in got if d.message.id in _ids(stale)} == {2}
    await sub.ack(got)
    restore.cancel()
    await proxy.cut()


@pytestmark_broker
async def test_publish_during_an_outage_fails_after_publish_timeout(
    amqp: tuple[str, Opener],
) -> None:
    # given a transport through a proxy, with a short publish timeout
    _, open_ = amqp
    proxy = Proxy()
    await proxy.start()
    bus = await open_(port=proxy.port, publish_timeout=1.5)
    await bus.declare_group("g", ["t"])

    # when the broker becomes unreachable and stays so
    await proxy.cut()
    started = time.monotonic()

    # then publish raises TransportError once the timeout has passed, not before (the outer
    # timeout only guards a hang)
    async with asyncio.timeout(60):
        with pytest.raises(TransportError, match="unreachable"):
            await bus.publish(_messages("t", 1))
    assert time.monotonic() - started >= 1.4


async def test_connecting_to_nothing_fails_fast_and_clearly() -> None:
    bus = RabbitMQTransport.from_url("amqp://guest:secret@127.0.0.1:1/?connect_timeout=2")
    with pytest.raises(TransportError) as caught:
        await bus.connect()
    assert "127.0.0.1:1" in str(caught.value)
    assert "secret" not in str(caught.value)
    with pytest.raises(TransportError, match="not connected"):
        await bus.publish(_messages("t", 1))


@pytestmark_broker
async def test_wrong_credentials_are_a_configuration_error() -> None:
    RABBITMQ.require()
    bus = RabbitMQTransport.from_url("amqp://guest:wrong@127.0.0.1:5672/?namespace=x")
    with pytest.raises(ConfigurationError, match="authentication"):
        await bus.connect()


@pytestmark_broker
async def test_closing_gives_back_buffered_and_held_messages_with_their_attempt(
    amqp: tuple[str, Opener],
) -> None:
    # given member A holding 2 messages, and 8 more buffered in its prefetch
    _, open_ = amqp
    a_bus, b_bus = await open_(), await open_()
    a = await a_bus.subscribe("g", ["t"], lease=30)
    sent = _messages("t", 10)
    await a_bus.publish(sent)
    held = await _receive(a, 2)
    assert await _eventually(lambda: a_bus.lag("g"), 0) == 0  # the other 8 are in its prefetch

    # when A closes
    await a.close()

    # then B gets all ten, each still a first attempt
    b = await b_bus.subscribe("g", ["t"], lease=30)
    got = await _receive(b, 10)
    assert _ids(got) == {m.id for m in sent}
    assert {d.attempt for d in got} == {1}
    assert len(held) == 2


@pytestmark_broker
async def test_a_member_that_stops_receiving_gives_its_buffer_to_the_others(
    amqp: tuple[str, Opener],
) -> None:
    # given member A (lease 2 s: idle after 1 s) that received 1 of 20 and buffered the rest
    _, open_ = amqp
    a_bus, b_bus = await open_(), await open_()
    a = await a_bus.subscribe("g", ["t"], lease=2)
    sent = _messages("t", 20)
    await a_bus.publish(sent)
    [mine] = await _receive(a, 1)
    b = await b_bus.subscribe("g", ["t"], lease=30)

    # when A stops receiving, then B gets the other 19 within a few seconds, as first attempts
    got = await _receive(b, 19, within=5)
    assert _ids(got) == {m.id for m in sent} - {mine.message.id}
    assert {d.attempt for d in got} == {1}
    await b.ack(got)
    await a.ack([mine])


@pytestmark_broker
async def test_acks_in_any_order_settle_exactly_what_they_name(amqp: tuple[str, Opener]) -> None:
    # given a member holding ten messages (prefetch 10: no others buffered)
    _, open_ = amqp
    bus, other_bus = await open_(prefetch=10), await open_()
    sub = await bus.subscribe("g", ["t"], lease=30)
    await bus.publish(_messages("t", 10))
    held = await _receive(sub, 10)
    by_tag = sorted(held, key=lambda d: d.handle.tag)

    # when it acks out of order, some as a prefix (one multiple-ack), some as gaps
    await sub.ack([by_tag[3], by_tag[7]])
    await sub.ack(by_tag[0:3])
    await sub.ack([by_tag[8], by_tag[9], by_tag[8]])  # a repeat is ignored
    await sub.retry(by_tag[6], 0)
    unsettled = {by_tag[i].message.id for i in (4, 5)}
    await sub.close()

    # then another member gets exactly the two never settled, and the retried one
    other = await other_bus.subscribe("g", ["t"], lease=30)
    got = await _receive(other, 3)
    got += await other.receive(10, 0.5)
    assert _ids(got) == unsettled | {by_tag[6].message.id}


@pytestmark_broker
async def test_big_batches_go_out_in_confirm_windows(amqp: tuple[str, Opener]) -> None:
    # given a transport confirming windows of 100
    _, open_ = amqp
    bus = await open_(publish_window=100, prefetch=1000)
    sub = await bus.subscribe("g", ["t"])

    # when 2,500 messages are published in one call
    sent = _messages("t", 2500)
    await bus.publish(sent)

    # then all arrive, once each
    got: list[Delivery] = []
    deadline = time.monotonic() + 20
    while len(got) < 2500 and time.monotonic() < deadline:
        batch = await sub.receive(500, 0.5)
        await sub.ack(batch)
        got += batch
    assert len(got) == 2500
    assert _ids(got) == {m.id for m in sent}


@pytestmark_broker
async def test_a_queue_left_with_other_arguments_is_a_configuration_error(
    amqp: tuple[str, Opener],
) -> None:
    # given a classic queue where the group's quorum queue should be
    ns, open_ = amqp
    bus = await open_()
    async with aiormq.connect(BASE) as conn:
        ch = await conn.channel()
        await ch.queue_declare(f"{ns}.g.legacy", durable=True)
        try:
            # when the group is declared, then the error says what is wrong
            with pytest.raises(ConfigurationError, match="other arguments"):
                await bus.declare_group("legacy", ["t"])
            # and the transport still works
            await bus.declare_group("fine", ["t"])
        finally:
            await ch.queue_delete(f"{ns}.g.legacy")


@pytestmark_broker
async def test_topics_that_would_be_wildcards_are_refused(amqp: tuple[str, Opener]) -> None:
    _, open_ = amqp
    bus = await open_()
    for topic in ("order.*", "#", ""):
        with pytest.raises(ConfigurationError, match="routing keys"):
            await bus.declare_group("g", [topic])


@pytestmark_broker
async def test_a_message_for_an_undeclared_group_waits_for_it(amqp: tuple[str, Opener]) -> None:
    # given no group "late" yet
    _, open_ = amqp
    bus = await open_()

    # when a message addressed to it is published, and only then it subscribes
    [sent] = _messages("t", 1)
    await bus.publish([Message(sent.id, sent.topic, sent.body, group="late")])
    sub = await bus.subscribe("late", [])

    # then it is there
    assert _ids(await _receive(sub, 1)) == {sent.id}


@pytestmark_broker
async def test_dead_letters_survive_reconnecting_and_keep_long_errors_in_bounds(
    amqp: tuple[str, Opener],
) -> None:
    # given a dead letter with a huge error text
    _, open_ = amqp
    bus = await open_()
    sub = await bus.subscribe("g", ["t"], lease=30)
    [sent] = _messages("t", 1)
    await bus.publish([sent])
    [delivery] = await _receive(sub, 1)
    await sub.dead_letter(delivery, Failure("boom", "ValueError", "é" * 100_000))

    # when another connection lists them
    [dead] = await (await open_()).dead_letters("g")

    # then it is there, its error cut to 16 KB of whole characters
    assert dead.message == Message(sent.id, "t", sent.body)
    assert len(dead.failure.error.encode()) <= 16_384
    assert set(dead.failure.error) == {"é"}
    assert await bus.dead_letters("other") == []
    assert await bus.dead_letters(limit=0) == []


@pytestmark_broker
async def test_lag_counts_waiting_messages_only(amqp: tuple[str, Opener]) -> None:
    _, open_ = amqp
    bus = await open_(prefetch=2)
    assert await bus.lag("nobody") is None
    sub = await bus.subscribe("g", ["t"])
    await bus.publish(_messages("t", 5))
    held = await _receive(sub, 2)
    assert len(held) == 2
    assert await _eventually(lambda: bus.lag("g"), 3) == 3  # two are with the member


async def _eventually(read: Callable[[], Awaitable[int | None]], expected: int) -> int | None:
    """Poll ``read`` until it gives ``expected`` (the broker's counts lag a little); the last
    value after 30 s, which only guard a hang."""
    value = await read()
    for _ in range(300):
        if value == expected:
            break
        await asyncio.sleep(0.1)
        value = await read()
    return value


@pytestmark_broker
async def test_receive_after_close_and_publish_after_close_raise(
    amqp: tuple[str, Opener],
) -> None:
    _, open_ = amqp
    bus = await open_()
    sub = await bus.subscribe("g", ["t"])
    await bus.close()
    with pytest.raises(TransportError):
        await sub.receive(1, 0.1)
    with pytest.raises(TransportError):
        await bus.publish(_messages("t", 1))
    await bus.connect()  # and it can be opened again
    await bus.publish(_messages("t", 1))


@pytestmark_broker
async def test_the_dead_letter_stream_exists_only_once_something_died(
    amqp: tuple[str, Opener],
) -> None:
    # given a namespace where nothing was dead-lettered
    ns, open_ = amqp
    bus = await open_()
    await bus.declare_group("g", ["t"])

    # then listing, replaying and discarding work without creating the stream
    assert await bus.dead_letters() == []
    assert await bus.replay("x") is False
    assert await bus.discard("x") is False
    assert await bus._length(f"{ns}.dlq") is None


@pytestmark_broker
async def test_delete_namespace_removes_what_the_namespace_created(
    amqp: tuple[str, Opener],
) -> None:
    # given a namespace with a group, a pending retry and a dead letter
    ns, open_ = amqp
    bus = await open_()
    sub = await bus.subscribe("g", ["t"])
    await bus.publish(_messages("t", 2))
    first, second = await _receive(sub, 2)
    await sub.retry(first, 60)
    await sub.dead_letter(second, Failure("r", "E", "e"))

    # when it is deleted (by another connection, naming the group)
    other = await open_()
    await other.delete_namespace(["g"])

    # then its queues are gone
    for queue in (f"{ns}.g.g", f"{ns}.dlq", f"{ns}.delay.15"):
        assert await other._length(queue) is None, queue


@pytestmark_broker
async def test_acks_racing_lease_expiries_never_break_the_channel(
    amqp: tuple[str, Opener],
) -> None:
    # given a member with a lease so short that leases run out while it acks
    _, open_ = amqp
    bus = await open_()
    sub = await bus.subscribe("g", ["t"], lease=0.2)
    await bus.publish(_messages("t", 300))
    epoch = sub._epoch

    # when the leases of batch A run out (the member nacks A's tags one by one) while it acks
    # batch B, whose tags come right after A's, in small multiple-acks
    for _ in range(5):
        await sub.receive(20, 1.0)  # A, never settled
        await asyncio.sleep(0.1)
        b = await sub.receive(20, 1.0)
        await asyncio.sleep(0.08)
        for start in range(0, len(b), 3):
            await sub.ack(b[start : start + 3])
            await asyncio.sleep(0.004)
        await asyncio.sleep(0.3)

    # then the broker never closed its channel over an unknown delivery tag
    assert sub._epoch == epoch
    assert sub._ch is not None and not sub._ch.is_closed


@pytestmark_broker
async def test_a_publish_window_also_stops_at_4_mib_of_bodies(
    amqp: tuple[str, Opener], monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a transport whose windows we watch
    _, open_ = amqp
    bus = await open_()
    sub = await bus.subscribe("g", ["t"])
    windows: list[int] = []
    send_window = bus._send_window

    async def watched(chunk: list[_Out], *args: object) -> tuple[list[_Out], object]:
        windows.append(len(chunk))
        return await send_window(chunk, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(bus, "_send_window", watched)

    # when twenty bodies of 512 KiB are published in one call
    big = [Message(uuid.uuid4().hex, "t", bytes(bus.max_message_bytes)) for _ in range(20)]
    await bus.publish(big)

    # then they went out in windows of at most 4 MiB (8 bodies), and all arrive
    assert windows == [8, 8, 4]
    got = await _receive(sub, 20, within=20)
    assert _ids(got) == {m.id for m in big}


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytestmark_broker
async def test_everything_works_with_permissions_limited_to_the_namespace(
    amqp: tuple[str, Opener],
) -> None:
    # given a user allowed to configure, write and read "^ns\." only
    require_command("rabbitmqctl")
    ns, _ = amqp
    user, password = f"{ns}_user", uuid.uuid4().hex
    await asyncio.to_thread(_rabbitmqctl, "add_user", user, password)
    try:
        pattern = f"^{ns}\\."
        await asyncio.to_thread(_rabbitmqctl, "set_permissions", user, pattern, pattern, pattern)
        bus = RabbitMQTransport.from_url(f"amqp://{user}:{password}@127.0.0.1:5672/?namespace={ns}")
        await bus.connect()
        try:
            # when it publishes, consumes, retries, dead-letters, lists, replays, gives back
            sub = await bus.subscribe("g", ["t"], lease=30)
            await bus.publish(_messages("t", 3))
            first, second, _third = await _receive(sub, 3)
            await sub.retry(first, 0.05)
            await sub.dead_letter(second, Failure("r", "E", "e"))
            [dead] = await bus.dead_letters("g")
            assert await bus.replay(dead.id) is True
            assert await bus.lag("g") is not None
            got = await _receive(sub, 2)
            assert _ids(got) == {first.message.id, second.message.id}
            await sub.close()  # gives back the third and the two just received

            # then nothing was refused, and the messages are all still there
            again = await bus.subscribe("g", ["t"])
            assert len(await _receive(again, 3)) == 3
            await bus.delete_namespace()
        finally:
            await bus.close()
    finally:
        await asyncio.to_thread(_rabbitmqctl, "delete_user", user)


@pytestmark_broker
async def test_the_limit_follows_the_servers_max_message_size_setting(
    amqp: tuple[str, Opener],
) -> None:
    # given a server said to accept bodies of 2,000 bytes at most
    _, open_ = amqp
    bus = await open_(max_message_size=2000)
    sub = await bus.subscribe("g", ["t"])
    assert bus.max_message_bytes == 2000

    # when a batch holds one body at that size and one over it
    fits = Message(uuid.uuid4().hex, "t", bytes(2000))
    over = Message(uuid.uuid4().hex, "t", bytes(2001))
    await bus.publish([fits, over])

    # then the first arrives, and the second reaches the group only as a dead letter by reference
    got = await _receive(sub, 2, within=3)
    assert _ids(got) == {fits.id}
    [dead] = await bus.dead_letters("g")
    assert (dead.message.id, dead.failure.reason) == (over.id, "payload too large")
    assert len(dead.message.body) < 2000
