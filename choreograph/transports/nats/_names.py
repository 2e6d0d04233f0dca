"""Names on the server, and what travels in message headers.

Every name is derived from the namespace, so systems (and tests) sharing a server never meet:

=============================  =================================================================
``{ns}_events``                the stream of events: subjects ``{ns}.ev.>`` and ``{ns}.grp.>``
``{ns}.ev.<topic>``            where a message of ``<topic>`` is published
``{ns}.grp.<group>.<topic>``   a message for one group only (replay)
``<group>~<topic>``            the group's durable consumer of one topic
``<group>``                    the group's durable consumer of ``{ns}.grp.<group>.>``
``{ns}_dlq``                   the stream of dead letters: subjects ``{ns}.dlq.>``
``{ns}.dlq.<group>``           a group's dead letters
=============================  =================================================================

A key-partitioned group (``partitioned=``, ``docs/ordering.md``) has, besides those:

=================================  =============================================================
``{ns}.grp.<group>~<p>.<topic>``   a message of the group's partition ``p`` (moved there by the
                                   group's router from the subjects above)
``<group>~~<p>``                   the durable consumer of partition ``p``
``{ns}_parts_<group>``             a stream of leases: subjects ``{ns}.parts.<group>.>``, one
                                   message kept per subject, each removed after the lease
=================================  =============================================================

``<topic>`` is the topic as one subject token: letters, digits, ``_`` and ``-`` stay as they are,
every other byte of its UTF-8 becomes ``=XX`` (``choreograph.HandlerFailed`` is
``choreograph=2EHandlerFailed``). The mapping is injective and never produces ``.``, ``*``, ``>``
or white space, so a topic can neither span tokens nor act as a wildcard. (Not ``%XX``:
nats-server 2.9 mishandles ``%`` in consumer names, whose pull requests then go unanswered.)
Group names are checked by :func:`~choreograph.transport.check_group` (letters, digits, ``_``,
``-``), so ``~`` separates the group from the topic without ambiguity.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any

from choreograph.logs import bounded_traceback
from choreograph.transport import Failure, Message

_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPED_TOKEN = re.compile(r"(?:[A-Za-z0-9_-]|=[0-9A-F]{2})+")
_TOKEN_PART = re.compile(r"=([0-9A-F]{2})|([A-Za-z0-9_-]+)")
_KEEP = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_MAX_CONSUMER_NAME = 200
"""Consumer names become directory names on the server; longer ones are hashed."""

ID_HEADER = "Nats-Msg-Id"
"""The event id, when it is plain printable ASCII; the server also deduplicates on it."""
ENCODED_ID_HEADER = "Choreograph-Id"
"""The event id as a JSON string, when it cannot travel as ``Nats-Msg-Id`` (or the message is
addressed to one group, whose ``Nats-Msg-Id`` must differ from the event's)."""
DEAD_LETTER_HEADER = "Choreograph-Dead-Letter"
"""On a dead-letter record: the JSON of what :class:`~choreograph.transport.DeadLetter` holds
beside the body (id, topic, group, failure, attempts, time)."""

_PLAIN_ID = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
MAX_ID_CHARS = 4096
MAX_ERROR_CHARS = 16384
"""Longer error texts are cut in dead-letter records (headers share the message size limit)."""


def topic_token(topic: str) -> str:
    """The topic as one subject token (see the module docstring)."""
    if _PLAIN_TOKEN.fullmatch(topic):
        return topic
    if not topic:
        return "="  # never produced otherwise: an escape is always '=' and two hex digits
    return "".join(chr(b) if b in _KEEP else f"={b:02X}" for b in topic.encode())


def token_topic(token: str) -> str:
    """The inverse of :func:`topic_token`. ValueError for a token it never produces (a bad
    escape such as ``=ZZ``, a dot, bytes that are not UTF-8...): a subject some other client
    wrote."""
    if _PLAIN_TOKEN.fullmatch(token):
        return token
    if token == "=":
        return ""
    if not _ESCAPED_TOKEN.fullmatch(token):
        raise ValueError(f"not a topic token: {token[:200]!r}")
    raw = bytearray()
    for escaped, plain in _TOKEN_PART.findall(token):
        raw += bytes.fromhex(escaped) if escaped else plain.encode()
    topic = raw.decode()  # UnicodeDecodeError is a ValueError
    if topic_token(topic) != token:
        raise ValueError(f"not the token of its topic (a needless escape?): {token[:200]!r}")
    return topic


class Names:
    """The streams, subjects and consumers of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.events = f"{namespace}_events"
        self.dlq = f"{namespace}_dlq"
        self.event_prefix = f"{namespace}.ev."
        self.group_prefix = f"{namespace}.grp."
        self.dlq_prefix = f"{namespace}.dlq."
        self.event_subjects = [f"{namespace}.ev.>", f"{namespace}.grp.>"]
        self.dlq_subjects = [f"{namespace}.dlq.>"]
        self._topics: dict[str, tuple[str, str | None]] = {}
        self._subjects: dict[str, str] = {}

    def topic_subject(self, topic: str) -> str:
        subject = self._subjects.get(topic)
        if subject is None:
            subject = self.event_prefix + topic_token(topic)
            if len(self._subjects) < 10_000:
                self._subjects[topic] = subject
        return subject

    def group_subject(self, group: str, topic: str) -> str:
        return f"{self.group_prefix}{group}.{topic_token(topic)}"

    def group_filter(self, group: str) -> str:
        return f"{self.group_prefix}{group}.>"

    def partition_subject(self, group: str, partition: int, topic: str) -> str:
        # '~' is no group name's character: no plain group's filter matches it
        return f"{self.group_prefix}{group}~{partition}.{topic_token(topic)}"

    def partition_filter(self, group: str, partition: int) -> str:
        return f"{self.group_prefix}{group}~{partition}.>"

    @staticmethod
    def partition_consumer(group: str, partition: int) -> str:
        # a topic token never starts with '~' (it is escaped): no topic consumer has this name
        return f"{group}~~{partition}"

    def leases_stream(self, group: str) -> str:
        return f"{self.namespace}_parts_{group}"

    def lease_subject(self, group: str, key: str) -> str:
        return f"{self.namespace}.parts.{group}.{key}"

    @property
    def leases_filter(self) -> str:
        """The subjects of every partitioned group's leases in the namespace."""
        return f"{self.namespace}.parts.>"

    def dlq_subject(self, group: str) -> str:
        return self.dlq_prefix + group

    def next_request(self, consumer: str) -> str:
        return f"$JS.API.CONSUMER.MSG.NEXT.{self.events}.{consumer}"

    @staticmethod
    def topic_consumer(group: str, topic: str) -> str:
        name = f"{group}~{topic_token(topic)}"
        if len(name) <= _MAX_CONSUMER_NAME:
            return name
        # '==' never occurs in a token, so a hashed name cannot equal a plain one
        return f"{group}~=={hashlib.sha256(topic.encode()).hexdigest()[:40]}"

    @staticmethod
    def group_consumer(group: str) -> str:
        return group

    @staticmethod
    def is_consumer_of(name: str, group: str) -> bool:
        return name == group or name.startswith(group + "~")

    def parse_subject(self, subject: str) -> tuple[str, str | None]:
        """(topic, group) of a subject of the events stream; group is None unless targeted.
        ValueError for a subject this transport never writes (another client's)."""
        known = self._topics.get(subject)
        if known is not None:
            return known
        if subject.startswith(self.group_prefix):
            group, _, token = subject[len(self.group_prefix) :].partition(".")
            # a partition's message (group~p) is one published to the topic, routed there
            parsed: tuple[str, str | None] = (token_topic(token), None if "~" in group else group)
        elif subject.startswith(self.event_prefix):
            parsed = (token_topic(subject[len(self.event_prefix) :]), None)
        else:
            raise ValueError(f"not a subject of the events stream: {subject[:200]!r}")
        if len(self._topics) < 10_000:
            self._topics[subject] = parsed
        return parsed


def message_headers(message: Message, nonce: str | None = None) -> dict[str, str]:
    """Headers carrying the event id. A message for one group gets a dedupe key of its own (made
    unique by ``nonce``, random by default), so that replaying an event the stream saw recently
    is not dropped as a duplicate of it."""
    if message.group is None and _PLAIN_ID.fullmatch(message.id):
        return {ID_HEADER: message.id}
    encoded = json.dumps(message.id)
    if message.group is None:
        return {ID_HEADER: encoded, ENCODED_ID_HEADER: encoded}
    key = f"{message.group}/{nonce or uuid.uuid4().hex}"
    return {ID_HEADER: key, ENCODED_ID_HEADER: encoded}


def message_id(headers: dict[str, str] | None, fallback: str) -> str:
    if not headers:
        return fallback
    encoded = headers.get(ENCODED_ID_HEADER)
    if encoded is not None:
        try:
            value = json.loads(encoded)
        except ValueError:
            return fallback
        return value if isinstance(value, str) else fallback
    return headers.get(ID_HEADER, fallback)


def dead_letter_header(
    message: Message,
    group: str,
    failure: Failure,
    attempts: int,
    failed_at: float,
    budget: int = 48 * 1024,
) -> str:
    """The JSON of a dead-letter record, at most ``budget`` bytes: a long error text (then its
    traceback) is cut, keeping its beginning (the traceback its end), until it fits."""
    error = failure.error[:MAX_ERROR_CHARS]
    trace = bounded_traceback(failure.traceback)
    while True:
        record = {
            "id": message.id,
            "topic": message.topic,
            "group": group,
            "reason": failure.reason[:200],
            "error_type": failure.error_type[:200],
            "error": error,
            "traceback": trace,
            "attempts": attempts,
            "failed_at": failed_at,
        }
        # ensure_ascii: no CR/LF or non-ASCII can reach the header line
        header = json.dumps(record, ensure_ascii=True, separators=(",", ":"))
        if len(header) <= budget or not (error or trace):
            return header
        if trace:
            trace = trace[len(trace) // 2 :] if len(trace) > 64 else ""
        else:
            error = error[: len(error) // 2] if len(error) > 64 else ""


def parse_dead_letter_header(value: str) -> dict[str, Any] | None:
    try:
        record = json.loads(value)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        return None
    return record


def parse_headers(raw: bytes) -> dict[str, str]:
    """Parse a ``NATS/1.0`` header block (as returned base64-encoded by the stream API)."""
    headers: dict[str, str] = {}
    for line in raw.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.decode(errors="replace").strip()] = value.decode(errors="replace").strip()
    return headers
