"""The ``nats://`` transport: streams, groups as durable consumers, publishing, dead letters."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import time
from collections.abc import Collection, Sequence
from typing import Any, Self

from nats.js.errors import APIError, NotFoundError

from choreograph.envelope import MAX_EVENT_BYTES
from choreograph.errors import ConfigurationError, PayloadTooLarge, TransportError
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
from choreograph.transports.nats._client import Client, Outgoing
from choreograph.transports.nats._errors import translated
from choreograph.transports.nats._names import (
    DEAD_LETTER_HEADER,
    ID_HEADER,
    MAX_ERROR_CHARS,
    MAX_ID_CHARS,
    Names,
    dead_letter_header,
    message_headers,
    parse_dead_letter_header,
    parse_headers,
)
from choreograph.transports.nats._partitions import PartitionedSubscription
from choreograph.transports.nats._settings import NatsSettings
from choreograph.transports.nats._subscription import NatsSubscription

_NANOS = 1_000_000_000
_HEADROOM = 64 * 1024
"""Bytes of the server's max_payload kept for headers (ids, dead-letter records)."""
_RECORD_FRAMING = 512
"""Bytes of a dead-letter record's header block besides its two values (names, separators)."""
_NO_MESSAGE = frozenset({10037})
"""JetStream error codes meaning "no message at that sequence" (get)."""


_PARTITIONED = "[partitioned: {}]"
"""In the description of a partitioned group's consumers and leases stream: its partitions."""
_PARTITIONED_RE = re.compile(r"\[partitioned: (\d+)\]")
_LEASE_TTL = 1.5
"""A partition lease lasts this many times the group's ack_wait (see _ensure_leases)."""


def _partitioned(description: str) -> int:
    found = _PARTITIONED_RE.search(description)
    return int(found.group(1)) if found else 0


def _window(duplicate_window: float, max_age: float) -> float:
    """The server refuses a duplicate window longer than the stream's max age."""
    return min(duplicate_window, max_age) if max_age > 0 else duplicate_window


class NatsTransport(Transport):
    """The bus on NATS JetStream (nats-server >= 2.9, one filter subject per consumer).

    See ``docs/transport-nats.md`` for the guarantees, the ordering it gives, the settings and how
    to run it in production.
    """

    scheme = "nats"
    member_order = "topic"  # a consumer per topic, pulled side by side

    def __init__(self, settings: NatsSettings | None = None) -> None:
        self.settings = settings or NatsSettings(url="nats://127.0.0.1:4222")
        self._names = Names(self.settings.namespace)
        self._client = Client(self.settings)
        self._subscriptions: set[NatsSubscription] = set()
        self._ack_waits: dict[str, float] = {}
        """Consumers known to exist, with the lease (ack_wait) they were last given here."""
        self._groups: dict[str, set[str]] = {}
        self._streams_ready = False
        self.max_message_bytes = MAX_EVENT_BYTES

    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(NatsSettings.from_url(url))

    def __repr__(self) -> str:
        return f"NatsTransport({redact(self.settings.url)!r})"

    def orders_across_members(self, group: str) -> bool:
        return group in self.settings.partitioned_groups

    def _partitions(self, group: str) -> int:
        """The partitions of ``group`` as configured here (0: not partitioned)."""
        s = self.settings
        return s.partitions if group in s.partitioned_groups else 0

    @staticmethod
    def _now() -> float:
        return time.time()

    # connection ---------------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._client.is_open and self._streams_ready:
            return
        await self._client.open()
        try:
            self._check_retention()
        except ConfigurationError:
            await self._client.close()
            raise
        server_limit = self._client.nc.max_payload - _HEADROOM
        self.max_message_bytes = max(1024, min(MAX_EVENT_BYTES, server_limit))
        with translated("creating the streams"):
            await self._ensure_streams()
        self._streams_ready = True

    def _check_retention(self) -> None:
        """Refuse what the server is known to break: on nats-server 2.9, a replicated stream with
        interest retention drops a message once one group acked it, before every other group's
        consumer delivered it (seen on 2.9.10 with a 3-node cluster, 1 to 12 messages of 300 per
        group, with no node lost; replicas=1 and retention=limits lose none)."""
        s = self.settings
        version = self._client.nc.connected_server_version
        if (
            s.replicas > 1
            and s.retention == "interest"
            and (version.major, version.minor) < (2, 10)
        ):
            seen = f"{version.major}.{version.minor}.{version.patch}"
            raise ConfigurationError(
                f"retention=interest with replicas={s.replicas} loses messages on nats-server "
                f"{seen} (a message is removed once one group acked it, before the others got "
                "it): use retention=limits with max_age=<seconds> (see docs/transport-nats.md)"
            )

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            await sub.close()
        self._streams_ready = False
        self._ack_waits.clear()
        await self._client.close()

    def _check_open(self) -> None:
        if not (self._client.is_open and self._streams_ready):
            raise TransportError("NATS: the transport is not connected (call connect() first)")

    async def delete_namespace(self) -> None:
        streams = [self._names.events, self._names.dlq]
        with contextlib.suppress(Exception):  # the partitioned groups' leases, if any
            found = await self._client.api("STREAM.NAMES", {"subject": self._names.leases_filter})
            streams += found.get("streams") or []
        for stream in streams:
            with contextlib.suppress(Exception):  # absent already
                await self._client.api(f"STREAM.DELETE.{stream}")

    async def _ensure_streams(self) -> None:
        names, s = self._names, self.settings
        replicas, storage = s.replicas, s.storage
        await self._ensure_stream(
            {
                "name": names.events,
                "description": f"choreograph events of namespace {names.namespace}",
                "subjects": names.event_subjects,
                "retention": s.retention,
                "storage": storage,
                "num_replicas": replicas,
                "max_age": int(s.max_age * _NANOS),
                "max_bytes": s.max_bytes,
                "max_msg_size": -1,
                "discard": "new",
                "duplicate_window": int(_window(s.duplicate_window, s.max_age) * _NANOS),
            }
        )
        await self._ensure_stream(
            {
                "name": names.dlq,
                "description": f"choreograph dead letters of namespace {names.namespace}",
                "subjects": names.dlq_subjects,
                "retention": "limits",
                "storage": storage,
                "num_replicas": replicas,
                "max_age": int(s.dlq_max_age * _NANOS),
                "discard": "new",
                "duplicate_window": int(
                    _window(min(s.duplicate_window, 120), s.dlq_max_age) * _NANOS
                ),
            }
        )

    async def _existing_stream(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """The configuration of the stream ``config`` names as the server has it, or None when
        this call created it with ``config``."""
        name = config["name"]
        try:
            info = await self._client.api(f"STREAM.INFO.{name}")
        except NotFoundError:
            try:
                await self._client.api(f"STREAM.CREATE.{name}", config)
                return None
            except APIError as exc:
                if exc.err_code != 10058:  # created meanwhile by another process
                    raise TransportError(f"NATS: cannot create stream {name}: {exc}") from exc
                info = await self._client.api(f"STREAM.INFO.{name}")
        existing: dict[str, Any] = info.get("config", {})
        return existing

    async def _ensure_stream(self, config: dict[str, Any]) -> None:
        name = config["name"]
        existing = await self._existing_stream(config)
        if existing is None:
            return
        missing = set(config["subjects"]) - set(existing.get("subjects") or [])
        if missing or existing.get("retention") != config["retention"]:
            raise ConfigurationError(
                f"stream {name} exists on the server with another configuration "
                f"(subjects {existing.get('subjects')}, retention {existing.get('retention')}); "
                f"expected subjects {config['subjects']}, retention {config['retention']}: "
                "use another namespace or delete the stream"
            )

    # groups -------------------------------------------------------------------------------------

    def _consumer_config(
        self, group: str, topic: str | int | None, ack_wait: float
    ) -> dict[str, Any]:
        """The config of one of ``group``'s consumers: of a topic, of what is sent to the group
        alone (``topic`` None), or of a partition (``topic`` its number)."""
        names, s = self._names, self.settings
        if topic is None:
            name = names.group_consumer(group)
            subject = names.group_filter(group)
            what = f"group {group}: messages sent to it alone (replays)"
        elif isinstance(topic, int):
            name = names.partition_consumer(group, topic)
            subject = names.partition_filter(group, topic)
            what = f"group {group}: partition {topic}"
        else:
            name = names.topic_consumer(group, topic)
            subject = names.topic_subject(topic)
            what = f"group {group}: topic {topic[:200]}"
        partitions = self._partitions(group)
        if partitions:
            what += f" {_PARTITIONED.format(partitions)}"
        return {
            "durable_name": name,
            "description": f"choreograph {what}",
            "filter_subject": subject,
            "deliver_policy": "new",
            "ack_policy": "explicit",
            "ack_wait": int(ack_wait * _NANOS),
            "max_deliver": s.max_deliver,
            "max_ack_pending": s.max_ack_pending,
            "replay_policy": "instant",
            "num_replicas": s.replicas,
            "mem_storage": s.storage == "memory",
        }

    async def _declare(self, group: str, topics: Collection[str], lease: float | None) -> list[str]:
        """Create the group's consumers that are missing; with ``lease``, set their ack_wait.
        Returns the names of the consumers of its topics and of what is sent to it alone (for a
        partitioned group, those its router pulls from; its partitions' consumers come after)."""
        check_group(group)
        self._check_open()
        wanted: list[str | None] = [None, *sorted(set(topics))]
        partitions = self._partitions(group)
        names: list[str] = []
        for topic in [*wanted, *range(partitions)]:
            config = self._consumer_config(group, topic, lease or self.settings.ack_wait)
            name = config["durable_name"]
            names.append(name)
            known = self._ack_waits.get(name)
            if known is not None and (lease is None or known <= lease + 1e-6):
                continue
            await self._ensure_consumer(name, config, lease, group)
        self._groups.setdefault(group, set()).update(names)
        if partitions:
            await self._ensure_leases(group, max(self._ack_waits[n] for n in names))
        return names[: len(wanted)]

    async def _ensure_leases(self, group: str, ack_wait: float) -> None:
        """The stream of ``group``'s partition leases. A lease is a message that the stream
        removes after its ``max_age``: 1.5 times the longest ack_wait of the group's consumers,
        so that a dead member's deliveries are due again before its partitions move."""
        names, s = self._names, self.settings
        stream = names.leases_stream(group)
        ttl = int(ack_wait * _LEASE_TTL * _NANOS)
        description = f"choreograph leases of group {group} {_PARTITIONED.format(s.partitions)}"
        config = {
            "name": stream,
            "description": description,
            "subjects": [names.lease_subject(group, ">")],
            "retention": "limits",
            "storage": s.storage,
            "num_replicas": s.replicas,
            "max_age": ttl,
            "max_msgs_per_subject": 1,
            "discard": "old",
            "duplicate_window": min(ttl, _NANOS),
        }
        existing = await self._existing_stream(config)
        if existing is None:
            return
        if existing.get("description") != description:
            raise ConfigurationError(
                f"group {group!r} is partitioned on the server as {existing.get('description')!r}"
                f", declared here with {s.partitions} partitions: give every member the same "
                "'partitioned' and 'partitions' options"
            )
        if abs(int(existing.get("max_age", 0)) - ttl) > ttl // 100:
            # the group's ack_wait changed (a shorter lease): its leases follow
            update = {**existing, "max_age": ttl, "duplicate_window": min(ttl, _NANOS)}
            await self._client.api(f"STREAM.UPDATE.{stream}", update)

    async def _ensure_consumer(
        self, name: str, config: dict[str, Any], lease: float | None, group: str
    ) -> None:
        stream = self._names.events
        request = {"stream_name": stream, "config": config}
        try:
            info = await self._client.api(f"CONSUMER.INFO.{stream}.{name}")
        except NotFoundError:
            info = await self._client.api(f"CONSUMER.DURABLE.CREATE.{stream}.{name}", request)
        else:
            current = info.get("config", {}).get("ack_wait", 0) / _NANOS
            found = _partitioned(info.get("config", {}).get("description", ""))
            wanted = self._partitions(group)
            if found != wanted and (found or not wanted or "~~" in name):
                raise ConfigurationError(
                    f"group {group!r} has {found} partitions on the server (0: not "
                    f"partitioned), declared here with {wanted}: give every member the same "
                    "'partitioned' and 'partitions' options (a group's partitions are set when "
                    "it is first declared partitioned)"
                )
            if found != wanted:
                # a plain group made partitioned (its members stopped): its consumers now feed
                # the router, and say so, so that a plain member is refused from now on
                config = {**config, "ack_wait": min(config["ack_wait"], int(current * _NANOS))}
                request = {"stream_name": stream, "config": config}
                info = await self._client.api(f"CONSUMER.DURABLE.CREATE.{stream}.{name}", request)
            elif lease is not None and lease < current - 1e-6:
                # ack_wait is the consumer's, shared by the group's members and applied to what
                # they already hold: the shortest lease asked for wins (a dead member's messages
                # come back in time; a member wanting longer keeps its own, see NatsSubscription)
                info = await self._client.api(f"CONSUMER.DURABLE.CREATE.{stream}.{name}", request)
        self._ack_waits[name] = info.get("config", {}).get("ack_wait", 0) / _NANOS

    async def declare_group(self, group: str, topics: Collection[str]) -> None:
        with translated(f"declaring group {group}"):
            await self._declare(group, topics, None)

    async def subscribe(
        self, group: str, topics: Collection[str], *, lease: float = 30.0
    ) -> NatsSubscription:
        if not lease > 0:
            raise ConfigurationError(f"lease must be > 0 seconds, got {lease}")
        with translated(f"declaring group {group}"):
            consumers = await self._declare(group, topics, lease)
        partitions = self._partitions(group)
        sub: NatsSubscription
        if partitions:
            sub = PartitionedSubscription(
                self, group, frozenset(topics), consumers, lease, partitions
            )
        else:
            sub = NatsSubscription(self, group, frozenset(topics), consumers, lease)
        with translated(f"joining group {group}"):
            await sub.start()
        self._subscriptions.add(sub)
        return sub

    async def lag(self, group: str) -> int | None:
        self._check_open()
        with translated(f"reading the lag of {group}"):
            return await self._lag(group)

    async def _lag(self, group: str) -> int | None:
        names = self._groups.get(group) or await self._list_consumers(group)
        if not names:
            return None
        total = 0
        for name in sorted(names):
            try:
                info = await self._client.api(f"CONSUMER.INFO.{self._names.events}.{name}")
            except NotFoundError:
                continue
            total += int(info.get("num_pending", 0))
        return total

    async def _list_consumers(self, group: str) -> set[str]:
        return {n for n in await self._consumer_names() if self._names.is_consumer_of(n, group)}

    async def _consumer_names(self) -> list[str]:
        """Every consumer of the events stream."""
        found: list[str] = []
        while True:
            page = await self._client.api(
                f"CONSUMER.NAMES.{self._names.events}", {"offset": len(found)}
            )
            batch = page.get("consumers") or []
            found += batch
            if not batch or len(found) >= int(page.get("total", 0)):
                return found

    # publishing ---------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> None:
        self._check_open()
        for message in messages:
            if len(message.id) > MAX_ID_CHARS:
                raise PayloadTooLarge(
                    f"message id of {len(message.id)} characters; the limit is {MAX_ID_CHARS}"
                )
            if message.group is not None:
                check_group(message.group)
        fits, over = split_oversized(messages, self.max_message_bytes)
        outgoing = [self._outgoing(m) for m in fits]
        if over:
            with translated("dead-lettering oversized messages"):
                for message in over:
                    outgoing += await self._unsent(message)
        await self._client.publish(outgoing)

    async def _unsent(self, message: Message) -> list[Outgoing]:
        """The dead-letter records, by reference, of a message too big to send: one for each
        group it was meant for (its target, or every group whose consumer takes its topic)."""
        reference, failure = oversized(message, self.max_message_bytes)
        if message.group is not None:
            groups = [message.group]
        else:
            groups = sorted(
                {
                    name.partition("~")[0]
                    for name in await self._consumer_names()
                    if name == Names.topic_consumer(name.partition("~")[0], message.topic)
                }
            )
        digest = hashlib.sha256(message.id.encode()).hexdigest()[:32]
        return [
            # the same message refused twice (an outbox relayed again) is recorded once
            self.dead_letter_record(reference, group, failure, 0, f"dl/{group}/unsent/{digest}")
            for group in groups
        ]

    def dead_letter_record(
        self, message: Message, group: str, failure: Failure, attempts: int, key: str
    ) -> Outgoing:
        """What is published to ``group``'s dead letters for ``message`` (deduplicated by the
        server on ``key``). A body over :attr:`max_message_bytes` (a foreign message near the
        server's max_payload) is kept by reference (:func:`oversized`); the record's texts are
        cut to what the server's max_payload leaves, so the record is never refused."""
        if len(message.body) > self.max_message_bytes:
            reference, why = oversized(message, self.max_message_bytes)
            message = reference
            failure = Failure(
                failure.reason,
                failure.error_type,
                f"{failure.error[:MAX_ERROR_CHARS]} ({why.error})",
                failure.traceback,
            )
        budget = self._client.max_payload - len(message.body) - len(key) - _RECORD_FRAMING
        header = dead_letter_header(message, group, failure, attempts, self._now(), budget)
        headers = {ID_HEADER: key, DEAD_LETTER_HEADER: header}
        return self._names.dlq_subject(group), message.body, headers

    def _outgoing(self, message: Message, nonce: str | None = None) -> Outgoing:
        names = self._names
        if message.group is None:
            subject = names.topic_subject(message.topic)
        else:
            subject = names.group_subject(message.group, message.topic)
        return subject, message.body, message_headers(message, nonce)

    # dead letters -------------------------------------------------------------------------------

    async def _dead_letter_at(
        self, seq: int, subject: str | None
    ) -> tuple[int, DeadLetter | None] | None:
        """The first dead-letter record at or after ``seq`` (on ``subject`` if given), or None.
        Returns its sequence and the record (None when the message is not one of ours)."""
        request: dict[str, Any] = {"seq": seq}
        if subject is not None:
            request["next_by_subj"] = subject
        try:
            answer = await self._client.api(f"STREAM.MSG.GET.{self._names.dlq}", request)
        except NotFoundError:
            return None
        except APIError as exc:
            if exc.err_code in _NO_MESSAGE:
                return None
            raise
        raw = answer["message"]
        found = int(raw["seq"])
        headers = parse_headers(base64.b64decode(raw.get("hdrs") or ""))
        record = parse_dead_letter_header(headers.get(DEAD_LETTER_HEADER, ""))
        if record is None:
            return found, None
        body = base64.b64decode(raw.get("data") or "")
        dead = DeadLetter(
            id=str(found),
            group=str(record.get("group", "")),
            message=Message(record["id"], str(record.get("topic", "")), body),
            failure=Failure(
                str(record.get("reason", "")),
                str(record.get("error_type", "")),
                str(record.get("error", "")),
                str(record.get("traceback", "")),
            ),
            attempts=int(record.get("attempts", 0)),
            failed_at=float(record.get("failed_at", 0.0)),
        )
        return found, dead

    async def dead_letters(self, group: str | None = None, limit: int = 100) -> list[DeadLetter]:
        self._check_open()
        if group is not None:
            check_group(group)
        subject = self._names.dlq_subject(group) if group else self._names.dlq_subjects[0]
        found: list[DeadLetter] = []
        seq = 1
        with translated("listing dead letters"):
            while len(found) < limit:
                at = await self._dead_letter_at(seq, subject)
                if at is None:
                    break
                seq, dead = at[0] + 1, at[1]
                if dead is not None:
                    found.append(dead)
        return found

    @staticmethod
    def _sequence(dead_letter_id: str) -> int | None:
        if not dead_letter_id.isdigit() or len(dead_letter_id) > 19:
            return None
        seq = int(dead_letter_id)
        return seq if seq > 0 else None

    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        self._check_open()
        with translated(f"fetching dead letter {dead_letter_id[:40]}"):
            return await self._get_dead_letter(dead_letter_id)

    async def _get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        seq = self._sequence(dead_letter_id)
        if seq is None:
            return None
        at = await self._dead_letter_at(seq, None)
        if at is None or at[0] != seq:
            return None
        return at[1]

    async def replay(self, dead_letter_id: str, body: bytes | None = None) -> bool:
        self._check_open()
        with translated(f"replaying dead letter {dead_letter_id[:40]}"):
            return await self._replay(dead_letter_id, body)

    async def _replay(self, dead_letter_id: str, body: bytes | None) -> bool:
        dead = await self._get_dead_letter(dead_letter_id)
        if dead is None or not dead.group:
            return False
        original = dead.message
        message = Message(
            original.id, original.topic, original.body if body is None else body, dead.group
        )
        if len(message.body) > self.max_message_bytes:
            raise PayloadTooLarge(
                f"replayed body is {len(message.body)} bytes; the limit is {self.max_message_bytes}"
            )
        # published before the record is deleted: a crash in between replays twice, never loses
        await self._client.publish([self._outgoing(message, f"replay-{dead.id}")])
        await self._delete_dead_letter(int(dead.id))
        return True

    async def discard(self, dead_letter_id: str) -> bool:
        self._check_open()
        with translated(f"discarding dead letter {dead_letter_id[:40]}"):
            if await self._get_dead_letter(dead_letter_id) is None:
                return False
            return await self._delete_dead_letter(int(dead_letter_id))

    async def _delete_dead_letter(self, seq: int) -> bool:
        try:
            await self._client.api(f"STREAM.MSG.DELETE.{self._names.dlq}", {"seq": seq})
        except APIError as exc:
            if exc.code in (400, 404, 500) and "no message" in str(exc.description).lower():
                return False
            raise
        return True
