"""What only the SQLite transport does: its URL and settings, each refused with its exact words,
opening files that are not a bus, an old file upgraded, the default lease, replaying with a body
at the limit, and a closed member. (The conformance suite checks the shared contract.)"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import pytest

from choreograph.errors import ConfigurationError, PayloadTooLarge, TransportError
from choreograph.transport import Failure, Message
from choreograph.transports.sqlite import SqliteSettings, SqliteTransport

FAILURE = Failure("r", "E", "e")


def exactly(text: str) -> str:
    return f"^{re.escape(text)}$"


# settings ----------------------------------------------------------------------------------------


def test_defaults_and_every_option_from_the_url() -> None:
    plain = SqliteSettings.from_url("sqlite:///bus.db")
    assert (plain.path, plain.busy_timeout, plain.synchronous) == ("bus.db", 5.0, "normal")
    assert (plain.poll_interval, plain.min_poll_interval) == (0.02, 0.002)

    tuned = SqliteSettings.from_url(
        "sqlite:////tmp/x/bus.db?busy_timeout=0&poll_interval=10&min_poll_interval=10"
        "&synchronous=full&namespace=shop"
    )
    assert tuned.path == "/tmp/x/bus.db"
    assert (tuned.busy_timeout, tuned.poll_interval, tuned.min_poll_interval) == (0, 10, 10)
    assert (tuned.synchronous, tuned.namespace) == ("full", "shop")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nats://x", "not a sqlite:// URL: 'nats://x'"),
        (
            "sqlite://host/bus.db",
            "sqlite URL 'sqlite://host/bus.db' has a host ('host'); use sqlite:///rel.db "
            "for a relative path or sqlite:////abs/path.db for an absolute one",
        ),
        ("sqlite:///", "sqlite URL 'sqlite:///' names no file (sqlite:///bus.db)"),
        ("sqlite:///dir/", "sqlite URL 'sqlite:///dir/' names no file (sqlite:///bus.db)"),
        (
            "sqlite:///:memory:",
            "sqlite:///:memory: cannot be shared by connections; use memory:// instead",
        ),
        (
            "sqlite:///bus.db?path=x.db",
            "unknown option 'path' in transport URL sqlite:///bus.db?path=x.db; known: "
            "busy_timeout, min_poll_interval, namespace, poll_interval, synchronous "
            "(the file is the URL's path)",
        ),
        (
            "sqlite:///bus.db?url=x&busy_timeout=1",
            "unknown option 'url' in transport URL sqlite:///bus.db?url=x&busy_timeout=1; known: "
            "busy_timeout, min_poll_interval, namespace, poll_interval, synchronous "
            "(the file is the URL's path)",
        ),
        (
            "sqlite:///bus.db?url",
            "unknown option 'url' in transport URL sqlite:///bus.db?url; known: "
            "busy_timeout, min_poll_interval, namespace, poll_interval, synchronous "
            "(the file is the URL's path)",
        ),
        ("sqlite:///bus.db?busy_timeout", "option 'busy_timeout' expects float, got ''"),
        ("sqlite:///bus.db?busy_timeout=-1", "busy_timeout must be >= 0 seconds, got -1.0"),
        (
            "sqlite:///bus.db?synchronous=off",
            "synchronous must be one of normal, full, got 'off'",
        ),
    ],
)
def test_a_bad_url_is_refused_saying_exactly_why(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=exactly(message)):
        SqliteSettings.from_url(url)


def test_a_password_in_a_refused_url_is_not_shown() -> None:
    with pytest.raises(ConfigurationError) as refused:
        SqliteSettings.from_url("sqlite://user:s3cret@host/bus.db")
    assert "s3cret" not in str(refused.value)
    assert "has a host ('host')" in str(refused.value)


@pytest.mark.parametrize(
    ("minimum", "maximum"),
    [(0, 0.02), (0.05, 0.02), (0.002, 10.5), (-1, 1)],
)
def test_poll_intervals_out_of_order_or_range_are_refused(minimum: float, maximum: float) -> None:
    message = (
        "poll intervals must satisfy 0 < min_poll_interval <= poll_interval <= 10 seconds, "
        f"got min_poll_interval={float(minimum)}, poll_interval={float(maximum)}"
    )
    with pytest.raises(ConfigurationError, match=exactly(message)):
        SqliteSettings.from_url(
            f"sqlite:///bus.db?min_poll_interval={minimum}&poll_interval={maximum}"
        )


def test_equal_poll_intervals_are_accepted() -> None:
    settings = SqliteSettings.from_url("sqlite:///b.db?min_poll_interval=0.5&poll_interval=0.5")
    assert settings.min_poll_interval == settings.poll_interval == 0.5


# opening -----------------------------------------------------------------------------------------


async def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "bus.db"
    bus = SqliteTransport.from_url(f"sqlite:///{path}")
    message = (
        f"cannot open the sqlite bus {str(path)!r}: directory {str(path.parent)!r} does not exist"
    )
    with pytest.raises(ConfigurationError, match=exactly(message)):
        await bus.connect()


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are my notes, not a database" * 100)
    bus = SqliteTransport.from_url(f"sqlite:///{path}")

    with pytest.raises(ConfigurationError, match=f"^cannot use {re.escape(repr(str(path)))} as"):
        await bus.connect()


async def test_a_bus_locked_by_another_writer_fails_after_busy_timeout(tmp_path: Path) -> None:
    # given a bus file whose write lock another connection holds
    path = tmp_path / "bus.db"
    async with SqliteTransport.from_url(f"sqlite:///{path}"):
        pass
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=DELETE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        # when another process opens it with a short busy timeout
        bus = SqliteTransport.from_url(f"sqlite:///{path}?busy_timeout=0.2")
        started = time.monotonic()

        # then it keeps trying for that long, then says the bus is locked
        with pytest.raises(TransportError, match=f"^the sqlite bus {re.escape(repr(str(path)))}"):
            await bus.connect()
        assert time.monotonic() - started >= 0.2
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def test_an_old_bus_file_gets_the_traceback_column(tmp_path: Path) -> None:
    # given a bus file made before dead letters kept a traceback
    path = tmp_path / "bus.db"
    async with SqliteTransport.from_url(f"sqlite:///{path}"):
        pass
    old = sqlite3.connect(path)
    old.execute('ALTER TABLE "choreograph_dead_letters" DROP COLUMN traceback')
    old.commit()
    old.close()

    # when it is opened, then dead letters work, traceback included
    async with SqliteTransport.from_url(f"sqlite:///{path}") as bus:
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([Message("m1", "t", b"x")])
        [delivery] = await sub.receive(1, 5)
        await sub.dead_letter(delivery, Failure("r", "E", "e", "Traceback: here"))
        [dead] = await bus.dead_letters()
        assert dead.failure.traceback == "Traceback: here"


async def test_the_file_is_in_wal_mode_with_the_chosen_synchronous(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    async with SqliteTransport.from_url(f"sqlite:///{path}?synchronous=full") as bus:
        db = bus._conn()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert db.in_transaction is False


# members -----------------------------------------------------------------------------------------


async def test_the_lease_must_be_positive_and_defaults_to_30_seconds(tmp_path: Path) -> None:
    async with SqliteTransport.from_url(f"sqlite:///{tmp_path}/bus.db") as bus:
        for bad in (0, -1):
            with pytest.raises(ConfigurationError, match=f"^lease must be > 0 seconds, got {bad}$"):
                await bus.subscribe("g", ["t"], lease=bad)
        sub = await bus.subscribe("g", ["t", "u"])
        assert sub.topics == frozenset({"t", "u"})
        await bus.publish([Message("m1", "t", b"x")])
        before = time.time()
        [_delivery] = await sub.receive(1, 5)
        row = bus._conn().execute('SELECT available_at FROM "choreograph_queue"').fetchone()
        assert before + 30 <= row[0] <= time.time() + 30


async def test_a_closed_member_refuses_to_receive(tmp_path: Path) -> None:
    async with SqliteTransport.from_url(f"sqlite:///{tmp_path}/bus.db") as bus:
        sub = await bus.subscribe("g", ["t"])
        await sub.close()
        with pytest.raises(TransportError, match=r"^subscription is closed$"):
            await sub.receive(1, 0)


async def test_a_closed_transport_says_to_connect(tmp_path: Path) -> None:
    bus = SqliteTransport.from_url(f"sqlite:///{tmp_path}/bus.db")
    message = "the sqlite transport is not connected (call connect())"
    with pytest.raises(TransportError, match=exactly(message)):
        await bus.publish([Message("m1", "t", b"x")])
    await bus.connect()
    await bus.close()
    await bus.close()
    with pytest.raises(TransportError, match=exactly(message)):
        await bus.lag("g")


async def test_lag_of_an_unknown_group_is_none_and_of_a_known_one_counts(tmp_path: Path) -> None:
    async with SqliteTransport.from_url(f"sqlite:///{tmp_path}/bus.db") as bus:
        assert await bus.lag("g") is None
        await bus.declare_group("g", ["t"])
        assert await bus.lag("g") == 0
        await bus.publish([Message("m1", "t", b"x"), Message("m2", "t", b"y")])
        assert await bus.lag("g") == 2


async def test_a_replacement_body_at_the_limit_is_replayed_and_over_it_refused(
    tmp_path: Path,
) -> None:
    async with SqliteTransport.from_url(f"sqlite:///{tmp_path}/bus.db") as bus:
        bus.max_message_bytes = 100
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([Message("m1", "t", b"x"), Message("m2", "t", b"y")])
        for delivery in await sub.receive(2, 5):
            await sub.dead_letter(delivery, FAILURE)
        first, second = await bus.dead_letters()

        with pytest.raises(
            PayloadTooLarge, match=exactly("replacement body is 101 bytes; the limit is 100")
        ):
            await bus.replay(first.id, b"z" * 101)
        assert await bus.replay(second.id, b"z" * 100) is True
        [back] = await sub.receive(1, 5)
        assert back.message.body == b"z" * 100
        assert [d.id for d in await bus.dead_letters()] == [first.id]


async def test_closing_a_bus_never_connected_does_nothing(tmp_path: Path) -> None:
    bus = SqliteTransport.from_url(f"sqlite:///{tmp_path}/bus.db")
    await bus.close()
    assert not (tmp_path / "bus.db").exists()


async def test_dead_letters_lists_at_most_100_unless_asked_for_more(tmp_path: Path) -> None:
    async with SqliteTransport.from_url(f"sqlite:///{tmp_path}/bus.db") as bus:
        # given 101 dead letters of one group
        sub = await bus.subscribe("g", ["t"])
        await bus.publish([Message(f"m{n:03}", "t", b"x") for n in range(101)])
        for delivery in await sub.receive(101, 5):
            await sub.dead_letter(delivery, FAILURE)

        # then a listing gives the first 100 unless asked for more
        assert len(await bus.dead_letters()) == len(await bus.dead_letters("g")) == 100
        assert len(await bus.dead_letters(limit=1000)) == 101


@pytest.mark.parametrize("key", ["9" * 18, "9" * 19, "1" * 20, "-1", "\uff11\uff12"])
async def test_dead_letter_ids_of_any_shape_are_just_unknown(tmp_path: Path, key: str) -> None:
    async with SqliteTransport.from_url(f"sqlite:///{tmp_path}/bus.db") as bus:
        assert await bus.replay(key) is False
        assert await bus.discard(key) is False
