"""Dead letters: stored with their reason, never redelivered, listed, replayed to their group only,
discarded."""

from __future__ import annotations

import asyncio
import time

import pytest

from choreograph.errors import PayloadTooLarge
from choreograph.transport import Delivery, Failure, Subscription, Transport
from tests.conformance._helpers import ids, message, messages, receive_for, receive_n, unique
from tests.conftest import TransportFactory

FAILURE = Failure("schema violation", "SchemaViolation", "field 'weight' must be positive")


async def _dead_letter_one(
    bus: Transport, group: str, topic: str, *, lease: float = 30
) -> tuple[Subscription, Delivery]:
    sub = await bus.subscribe(group, [topic], lease=lease)
    await bus.publish([message(topic, b'{"weight": -1}')])
    [delivery] = await receive_n(sub, 1, within=5)
    await sub.dead_letter(delivery, FAILURE)
    return sub, delivery


async def test_dead_letter_keeps_the_message_and_why_it_failed(
    make_transport: TransportFactory,
) -> None:
    # given a member that received a message
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    before = time.time()

    # when it dead-letters it
    _, delivery = await _dead_letter_one(bus, group, topic)

    # then the group's dead letters list it with the original message and the failure
    [dead] = await bus.dead_letters(group)
    assert dead.group == group
    assert dead.message.id == delivery.message.id
    assert dead.message.topic == topic
    assert dead.message.body == b'{"weight": -1}'
    assert dead.failure == FAILURE
    assert dead.attempts == delivery.attempt == 1
    assert before - 5 <= dead.failed_at <= time.time() + 5
    assert isinstance(dead.id, str) and dead.id


async def test_dead_lettered_message_is_not_redelivered_and_the_rest_flow(
    make_transport: TransportFactory,
) -> None:
    # given a poison message among good ones, lease 1 s
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    sub = await bus.subscribe(group, [topic], lease=1.0)
    poison, *good = messages(topic, 4)
    await bus.publish([poison, *good])

    # when the poison message is dead-lettered and the others acked
    got = await receive_n(sub, 4, within=5)
    for delivery in got:
        if delivery.message.id == poison.id:
            await sub.dead_letter(delivery, FAILURE)
        else:
            await sub.ack([delivery])

    # then the good ones were all received, and nothing comes back, even after the lease
    assert sorted(ids(got)) == sorted(ids([poison, *good]))
    assert await receive_for(sub, 1.5) == []
    assert ids(d.message for d in await bus.dead_letters(group)) == [poison.id]


async def test_dead_letter_after_retries_records_the_attempts(
    make_transport: TransportFactory,
) -> None:
    # given a message retried once
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    sub = await bus.subscribe(group, [topic], lease=30)
    await bus.publish([message(topic)])
    [first] = await receive_n(sub, 1, within=5)
    await sub.retry(first, 0.1)
    [second] = await receive_n(sub, 1, within=5)

    # when its second attempt is dead-lettered
    await sub.dead_letter(second, Failure("attempts exhausted", "TimeoutError", "too slow"))

    # then the dead letter says 2 attempts
    [dead] = await bus.dead_letters(group)
    assert dead.attempts == 2
    assert dead.failure.reason == "attempts exhausted"


async def test_replay_sends_a_dead_letter_back_to_its_group_only(
    make_transport: TransportFactory,
) -> None:
    # given groups A and B on one topic; B acked the message, A dead-lettered it
    bus = await make_transport()
    topic, group_a = unique("topic"), unique("ga")
    b = await bus.subscribe(unique("gb"), [topic], lease=30)
    a, delivery = await _dead_letter_one(bus, group_a, topic)
    await b.ack(await receive_n(b, 1, within=5))
    [dead] = await bus.dead_letters(group_a)

    # when the dead letter is replayed
    assert await bus.replay(dead.id) is True

    # then A gets it again as a first attempt, B does not, and it left the dead letters
    got = await receive_n(a, 1, within=5)
    assert ids(got) == [delivery.message.id]
    assert got[0].attempt == 1
    assert got[0].message.topic == topic
    assert got[0].message.body == delivery.message.body
    assert await receive_for(b, 0.5) == []
    assert await bus.dead_letters(group_a) == []
    await a.ack(got)


async def test_replay_with_a_new_body_replaces_the_body(make_transport: TransportFactory) -> None:
    # given a dead letter
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    sub, delivery = await _dead_letter_one(bus, group, topic)
    [dead] = await bus.dead_letters(group)

    # when it is replayed with a corrected body
    assert await bus.replay(dead.id, body=b'{"weight": 1}') is True

    # then the group receives the same event (id, topic) with the new body
    [got] = await receive_n(sub, 1, within=5)
    assert got.message.id == delivery.message.id
    assert got.message.topic == topic
    assert got.message.body == b'{"weight": 1}'
    assert got.attempt == 1
    await sub.ack([got])


async def test_discard_deletes_a_dead_letter_for_good(make_transport: TransportFactory) -> None:
    # given a dead letter
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    sub, _ = await _dead_letter_one(bus, group, topic)
    [dead] = await bus.dead_letters(group)

    # when it is discarded
    assert await bus.discard(dead.id) is True

    # then it is gone: not listed, not replayable, not delivered
    assert await bus.dead_letters(group) == []
    assert await bus.discard(dead.id) is False
    assert await bus.replay(dead.id) is False
    assert await receive_for(sub, 0.3) == []


async def test_unknown_dead_letter_ids_are_refused(make_transport: TransportFactory) -> None:
    # given a transport with no dead letters
    bus = await make_transport()
    await bus.declare_group(unique("g"), [unique("topic")])

    # when replaying or discarding ids that do not exist (in shapes a user might type)
    # then both say False
    for unknown in ("999999999", "no-such-dead-letter", "1-0", ""):
        assert await bus.replay(unknown) is False, unknown
        assert await bus.discard(unknown) is False, unknown


async def test_dead_letters_of_all_groups_oldest_first_with_a_limit(
    make_transport: TransportFactory,
) -> None:
    # given two dead letters in group A, then one in group B
    bus = await make_transport()
    group_a, group_b, topic = unique("ga"), unique("gb"), unique("topic")
    a, first = await _dead_letter_one(bus, group_a, topic)
    await asyncio.sleep(0.01)
    await bus.publish([second := message(topic)])
    [delivery] = await receive_n(a, 1, within=5)
    await a.dead_letter(delivery, FAILURE)
    await asyncio.sleep(0.01)
    _, third = await _dead_letter_one(bus, group_b, unique("topic_b"))

    # then each group lists its own, oldest first; limit keeps the oldest
    assert ids(d.message for d in await bus.dead_letters(group_a)) == [first.message.id, second.id]
    assert ids(d.message for d in await bus.dead_letters(group_b)) == [third.message.id]
    assert ids(d.message for d in await bus.dead_letters(group_a, limit=1)) == [first.message.id]

    # and without a group, the list holds all three (other tests' dead letters may share a bus)
    everything = await bus.dead_letters(None, limit=1000)
    mine = [d.message.id for d in everything if d.group in (group_a, group_b)]
    assert mine == [first.message.id, second.id, third.message.id]


async def test_replay_with_an_oversized_body_is_refused_and_keeps_the_dead_letter(
    make_transport: TransportFactory,
) -> None:
    # given a dead letter
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    sub, _ = await _dead_letter_one(bus, group, topic)
    [dead] = await bus.dead_letters(group)

    # when it is replayed with a body over the limit, then it raises PayloadTooLarge
    with pytest.raises(PayloadTooLarge):
        await bus.replay(dead.id, body=b"x" * (bus.max_message_bytes + 1))

    # and the dead letter is still there, unchanged, and nothing was delivered
    [kept] = await bus.dead_letters(group)
    assert (kept.id, kept.message.body) == (dead.id, dead.message.body)
    assert await receive_for(sub, 0.3) == []


TRACEBACK = (
    "Traceback (most recent call last):\n"
    + '  File "handlers.py", line 12, in reserve\n    1 / 0\n' * 60
    + "ZeroDivisionError: division by zero (é)\n"
)


async def test_a_dead_letter_keeps_the_traceback_of_its_failure(
    make_transport: TransportFactory,
) -> None:
    # given a member that received a message
    bus = await make_transport()
    group, topic = unique("g"), unique("topic")
    sub = await bus.subscribe(group, [topic])
    await bus.publish([message(topic)])
    [delivery] = await receive_n(sub, 1, within=5)

    # when it dead-letters it with a failure that has a multi-line traceback
    failure = Failure("attempts exhausted", "ZeroDivisionError", "division by zero", TRACEBACK)
    await sub.dead_letter(delivery, failure)

    # then the dead letter, listed or fetched alone, keeps the traceback as it was
    [listed] = await bus.dead_letters(group)
    assert listed.failure == failure and listed.failure.traceback == TRACEBACK
    fetched = await bus.get_dead_letter(listed.id)
    assert fetched is not None and fetched.failure.traceback == TRACEBACK


async def test_one_dead_letter_is_fetched_by_its_id(make_transport: TransportFactory) -> None:
    # given three dead letters in two groups
    bus = await make_transport()
    topic = unique("topic")
    first, second = unique("g"), unique("g")
    await _dead_letter_one(bus, first, topic)
    sub = await bus.subscribe(second, [topic])
    await bus.publish(messages(topic, 2))
    for delivery in await receive_n(sub, 2, within=5):
        await sub.dead_letter(delivery, FAILURE)
    letters = await bus.dead_letters(second)
    assert len(letters) == 2

    # when one of them is fetched by its id
    wanted = letters[1]
    fetched = await bus.get_dead_letter(wanted.id)

    # then it is that letter, whole; an unknown or discarded id finds nothing
    assert fetched is not None
    assert (fetched.id, fetched.group, fetched.message, fetched.failure, fetched.attempts) == (
        wanted.id, wanted.group, wanted.message, wanted.failure, wanted.attempts,
    )  # fmt: skip
    assert await bus.get_dead_letter("no-such-letter") is None
    assert await bus.discard(wanted.id)
    assert await bus.get_dead_letter(wanted.id) is None
