"""``choreograph dlq`` on real dead letters, and ``publish``'s options: what each command and option
does to the bus, seen from a member of the group."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner, Result

from choreograph.cli import main
from choreograph.envelope import Envelope, decode, encode, new_envelope
from choreograph.transport import DeadLetter, Delivery, Failure, Message, transport_from_url
from tests.conformance._helpers import receive_n

HELLO = "examples.hello:app"
FAILURE = Failure("attempts exhausted", "RuntimeError", "mail server down")


@pytest.fixture
def bus(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/bus.db"


def cli(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin)


def ping(text: str) -> Envelope:
    return new_envelope("Ping", {"text": text}, source="test")


async def _bury(url: str, group: str, envelopes: list[Envelope]) -> list[DeadLetter]:
    """Dead-letter ``envelopes`` in ``group`` the way a worker does; return the group's letters."""
    async with transport_from_url(url) as transport:
        sub = await transport.subscribe(group, ["Ping"])
        await transport.publish([Message(e.id, e.type, encode(e), group) for e in envelopes])
        for delivery in await receive_n(sub, len(envelopes), within=30):
            await sub.dead_letter(delivery, FAILURE)
        await sub.close()
        return await transport.dead_letters(group)


def bury(url: str, group: str, *envelopes: Envelope) -> list[DeadLetter]:
    return asyncio.run(_bury(url, group, list(envelopes)))


async def _take(url: str, group: str, count: int) -> list[Delivery]:
    """What a member of ``group`` receives now (acked), waiting up to 30 s for ``count``."""
    async with transport_from_url(url) as transport:
        sub = await transport.subscribe(group, ["Ping"])
        got = await receive_n(sub, count, within=30)
        got += await sub.receive(100, 0.2)
        await sub.ack(got)
        await sub.close()
        return got


def take(url: str, group: str, count: int) -> list[Delivery]:
    return asyncio.run(_take(url, group, count))


def letters(url: str, group: str | None = None) -> list[DeadLetter]:
    async def read() -> list[DeadLetter]:
        async with transport_from_url(url) as transport:
            return await transport.dead_letters(group, 1000)

    return asyncio.run(read())


# replay ------------------------------------------------------------------------------------------


def test_replay_all_of_one_group_sends_them_back_to_that_group_only(bus: str) -> None:
    # given two dead letters in group A and one in group B
    a_letters = bury(bus, "ga", ping("a1"), ping("a2"))
    [b_letter] = bury(bus, "gb", ping("b1"))

    # when every dead letter of A is replayed
    result = cli("dlq", "replay", "--all", "--group", "ga", "-t", bus)

    # then A receives both again, as first attempts; B's letter stays dead, B receives nothing
    assert result.exit_code == 0, result.output
    assert "replayed 2 of 2" in result.output
    back = take(bus, "ga", 2)
    assert sorted(d.message.id for d in back) == sorted(d.message.id for d in a_letters)
    assert {d.attempt for d in back} == {1}
    assert [d.id for d in letters(bus)] == [b_letter.id]
    assert take(bus, "gb", 0) == []


def test_replay_all_without_a_group_replays_every_group(bus: str) -> None:
    # given dead letters in two groups
    bury(bus, "ga", ping("a1"))
    bury(bus, "gb", ping("b1"))

    # when all are replayed
    result = cli("dlq", "replay", "--all", "-t", bus)

    # then each group receives its own letter and none is left
    assert result.exit_code == 0, result.output
    assert "replayed 2 of 2" in result.output
    assert [decode(d.message.body).data["text"] for d in take(bus, "ga", 1)] == ["a1"]
    assert [decode(d.message.body).data["text"] for d in take(bus, "gb", 1)] == ["b1"]
    assert letters(bus) == []


def test_replay_with_data_sends_the_corrected_event(bus: str) -> None:
    # given a dead letter of a Ping whose text was wrong
    [dead] = bury(bus, "ga", original := ping("wrong"))

    # when it is replayed with corrected data
    result = cli("dlq", "replay", dead.id, "--data", '{"text": "right"}', "--app", HELLO, "-t", bus)

    # then the group receives the same event (same id, type, transaction) with the new data
    assert result.exit_code == 0, result.output
    [back] = take(bus, "ga", 1)
    fixed = decode(back.message.body)
    assert fixed.data == {"text": "right"}
    assert (fixed.id, fixed.type, fixed.correlationid) == (
        original.id,
        original.type,
        original.correlationid,
    )
    assert letters(bus) == []


def test_replay_with_data_from_stdin(bus: str) -> None:
    [dead] = bury(bus, "ga", ping("wrong"))

    result = cli(
        "dlq", "replay", dead.id, "--data", "-", "--app", HELLO, "-t", bus,
        stdin='{"text": "piped"}',
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    [back] = take(bus, "ga", 1)
    assert decode(back.message.body).data == {"text": "piped"}


def test_replay_with_data_of_an_unknown_id_is_a_clear_error(bus: str) -> None:
    # given a bus with one dead letter
    bury(bus, "ga", ping("kept"))

    # when a dead letter that does not exist is replayed with data
    result = cli("dlq", "replay", "nope", "--data", "{}", "--app", HELLO, "-t", bus)

    # then the command says so and exits 1, without a traceback, and nothing changed
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "no dead letter 'nope'" in result.output
    assert "Traceback" not in result.output
    assert len(letters(bus)) == 1


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ("{oops", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"text": 5}', "Ping: text"),
    ],
)
def test_replay_with_bad_data_is_refused_and_keeps_the_letter(
    bus: str, data: str, says: str
) -> None:
    [dead] = bury(bus, "ga", ping("kept"))

    result = cli("dlq", "replay", dead.id, "--data", data, "--app", HELLO, "-t", bus)

    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)
    assert says in result.output
    assert [d.id for d in letters(bus)] == [dead.id]


def test_replay_with_data_needs_exactly_one_id(bus: str) -> None:
    first, second = bury(bus, "ga", ping("one"), ping("two"))

    result = cli("dlq", "replay", first.id, second.id, "--data", "{}", "--app", HELLO, "-t", bus)

    assert result.exit_code != 0
    assert "exactly one dead letter" in result.output
    assert len(letters(bus)) == 2


def test_replay_of_known_and_unknown_ids_replays_the_known_and_exits_1(bus: str) -> None:
    [dead] = bury(bus, "ga", ping("one"))

    result = cli("dlq", "replay", dead.id, "999", "-t", bus)

    assert result.exit_code == 1
    assert "no dead letter 999" in result.output
    assert "replayed 1 of 2" in result.output
    assert len(take(bus, "ga", 1)) == 1


# discard, list, show -----------------------------------------------------------------------------


def test_discard_deletes_an_existing_dead_letter_for_good(bus: str) -> None:
    # given two dead letters
    first, second = bury(bus, "ga", ping("one"), ping("two"))

    # when the first is discarded
    result = cli("dlq", "discard", first.id, "-t", bus)

    # then it is gone (not listed, cannot be replayed), the other one stays
    assert result.exit_code == 0, result.output
    assert "discarded 1" in result.output
    assert [d.id for d in letters(bus)] == [second.id]
    again = cli("dlq", "replay", first.id, "-t", bus)
    assert again.exit_code == 1
    assert take(bus, "ga", 0) == []


def test_list_filters_by_group_limits_and_prints_json(bus: str) -> None:
    # given two dead letters in A and one in B
    a1, _a2 = bury(bus, "ga", ping("a1"), ping("a2"))
    bury(bus, "gb", ping("b1"))

    # when A's are listed as JSON, at most one
    result = cli("dlq", "list", "--group", "ga", "--limit", "1", "--json", "-t", bus)

    # then one JSON line: A's oldest, with its reason, error and message
    assert result.exit_code == 0, result.output
    [line] = result.output.splitlines()
    item = orjson.loads(line)
    assert (item["id"], item["group"], item["topic"]) == (a1.id, "ga", "Ping")
    assert (item["reason"], item["error_type"], item["error"]) == (
        "attempts exhausted",
        "RuntimeError",
        "mail server down",
    )
    assert item["attempts"] == 1
    assert item["message"]["data"] == {"text": "a1"}


def test_list_as_a_table_and_show_one_letter(bus: str) -> None:
    [dead] = bury(bus, "ga", ping("hello"))

    table = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["dlq", "list", "-t", bus])
    shown = cli("dlq", "show", dead.id, "-t", bus)

    assert table.exit_code == 0, table.output
    assert "attempts exhausted" in table.output and "ga" in table.output
    assert shown.exit_code == 0, shown.output
    assert orjson.loads(shown.output)["message"]["data"] == {"text": "hello"}


# publish -----------------------------------------------------------------------------------------


def test_publish_continues_a_transaction_under_a_given_source(bus: str) -> None:
    # given a group listening to Ping
    async def declare() -> None:
        async with transport_from_url(bus) as transport:
            await transport.declare_group("watch", ["Ping"])

    asyncio.run(declare())

    # when a Ping is published with a correlation id and a source
    result = cli(
        "publish", "Ping", '{"text": "hi"}', "--app", HELLO, "-t", bus,
        "--correlation-id", "order-7", "--source", "shop-admin",
    )  # fmt: skip

    # then the event carries both, and its data
    assert result.exit_code == 0, result.output
    assert "correlation=order-7" in result.output
    [got] = take(bus, "watch", 1)
    envelope = decode(got.message.body)
    assert (envelope.correlationid, envelope.source) == ("order-7", "shop-admin")
    assert envelope.data == {"text": "hi"}


def test_publish_reads_data_from_stdin(bus: str) -> None:
    result = cli("publish", "Ping", "-", "--app", HELLO, "-t", bus, stdin='{"text": "piped"}')

    assert result.exit_code == 0, result.output
    assert "published Ping" in result.output
