"""Details of the store contract the main suite left unchecked (found by the mutation run of
docs/testing.md): default limits, mixed filters, what ``transaction_ended`` returns, what a claim
returns, what pruning counts, and a store used after it was closed."""

from __future__ import annotations

from pathlib import Path

import pytest

from choreograph.store import OutboxRow, Store, Timer, store_from_url

NOW = 1_000_000.0


async def test_find_and_list_timers_return_at_most_100_by_default(store: Store) -> None:
    # given 101 documents and 101 timers
    async with store.transaction() as tx:
        for n in range(101):
            await tx.put("drone", f"d{n:03}", {"n": n})
            await tx.set_timer(Timer("deadline:x", f"k{n:03}", NOW + n, {}))

    # then find and list_timers give the first 100 unless asked for more
    async with store.transaction() as tx:
        found = await tx.find("drone")
        assert [key for key, _ in found] == [f"d{n:03}" for n in range(100)]
        assert len(await tx.find("drone", limit=1000)) == 101
        assert await tx.count("drone") == 101
    assert len(await store.list_timers()) == 100
    assert len(await store.list_timers(limit=1000)) == 101


async def test_find_with_a_null_field_still_applies_the_other_fields(store: Store) -> None:
    # given drones with and without a pilot, free or busy
    async with store.transaction() as tx:
        await tx.put("drone", "d1", {"pilot": None, "status": "free"})
        await tx.put("drone", "d2", {"pilot": None, "status": "busy"})
        await tx.put("drone", "d3", {"pilot": "ann", "status": "free"})

    # when filtering on no pilot and free, then only d1 matches
    async with store.transaction() as tx:
        found = await tx.find("drone", {"pilot": None, "status": "free"})
        assert [key for key, _ in found] == ["d1"]
        assert await tx.count("drone", {"pilot": None, "status": "free"}) == 1
        both = await tx.find("drone", {"status": "free", "pilot": None})
        assert [key for key, _ in both] == ["d1"]


async def test_transaction_ended_returns_the_first_terminal_type(store: Store) -> None:
    async with store.transaction() as tx:
        assert await tx.transaction_ended("c1") is None
        await tx.end_transaction("c1", "DeliveryCompleted", NOW)
        await tx.end_transaction("c1", "DeliveryFailed", NOW + 1)

    async with store.transaction() as tx:
        assert await tx.transaction_ended("c1") == "DeliveryCompleted"
        assert await tx.transaction_ended("c2") is None


async def test_claimed_rows_come_back_whole(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.add_outbox([OutboxRow("o1", "topic.a", b"body one", NOW - 5)])

    [row] = await store.claim_outbox(NOW, 10, 30)

    assert row == OutboxRow("o1", "topic.a", b"body one", NOW - 5)


async def test_prune_counts_forgotten_ended_transactions_too(store: Store) -> None:
    # given two old processed ids and one old ended transaction, and one recent of each
    async with store.transaction() as tx:
        await tx.remember("e1", NOW - 100)
        await tx.remember("e2", NOW - 100)
        await tx.remember("e3", NOW)
        await tx.end_transaction("c1", "Done", NOW - 100)
        await tx.end_transaction("c2", "Done", NOW)

    # when pruning before NOW - 10, then three records are forgotten, the recent ones kept
    assert await store.prune_inbox(NOW - 10) == 3
    async with store.transaction() as tx:
        assert [await tx.seen(e) for e in ("e1", "e2", "e3")] == [False, False, True]
        assert await tx.transaction_ended("c1") is None
        assert await tx.transaction_ended("c2") == "Done"


async def test_a_closed_sqlite_store_refuses_work_until_opened_again(tmp_path: Path) -> None:
    # given a SQLite store that held a document, closed
    store = store_from_url(f"sqlite:///{tmp_path}/s.db", "svc")
    await store.open()
    async with store.transaction() as tx:
        await tx.put("k", "1", {"v": 1})
    await store.close()

    # when it is used, then it says it is not open
    with pytest.raises(RuntimeError, match=r"^store sqlite:///.+ is not open$"):
        async with store.transaction() as tx:
            await tx.get("k", "1")

    # and once opened again it works, with its data
    await store.open()
    try:
        async with store.transaction() as tx:
            assert await tx.get("k", "1") == {"v": 1}
    finally:
        await store.close()


async def test_a_failed_savepoint_keeps_what_an_earlier_one_wrote_when_it_read_it(
    store: Store,
) -> None:
    """(PostgreSQL writes a held document's put later, with the next read or the commit: a
    savepoint that reads, and so writes the earlier put, then fails must not take it along.)"""
    async with store.transaction() as tx:
        async with tx.savepoint():
            await tx.get("doc", "a")
            await tx.put("doc", "a", {"v": 1})
        with pytest.raises(RuntimeError):
            async with tx.savepoint():
                assert await tx.find("doc") == [("a", {"v": 1})]
                await tx.put("doc", "a", {"v": 2})
                await tx.put("doc", "b", {"v": 2})
                raise RuntimeError("the handler failed")
        assert await tx.get("doc", "a") == {"v": 1}
        assert await tx.get("doc", "b") is None
        assert await tx.count("doc") == 1
    async with store.transaction() as tx:
        assert await tx.find("doc") == [("a", {"v": 1})]


async def test_a_document_is_stored_as_it_was_when_put(store: Store) -> None:
    async with store.transaction() as tx:
        doc = {"v": 1}
        await tx.get("doc", "a")
        await tx.put("doc", "a", doc)
        doc["v"] = 2  # a change after the put is not stored
        assert await tx.get("doc", "a") == {"v": 1}
        assert await tx.delete("doc", "a") is True
        assert await tx.get("doc", "a") is None
    async with store.transaction() as tx:
        assert await tx.get("doc", "a") is None


async def test_an_end_recorded_after_a_lookup_stays_known_after_reads_and_savepoints(
    store: Store,
) -> None:
    """(PostgreSQL writes an end it had looked up with the next read of documents: it must
    still answer with it afterwards, and forget it only with a savepoint that rolls it back.)"""
    async with store.transaction() as tx:
        assert await tx.ended_transactions(["c1", "c2"]) == {}
        async with tx.savepoint():
            await tx.end_transaction("c1", "DeliveryFailed", NOW)
            await tx.get("doc", "a")
            await tx.put("doc", "a", {"v": 1})
        assert await tx.find("doc") == [("a", {"v": 1})]  # writes what was buffered
        assert await tx.transaction_ended("c1") == "DeliveryFailed"
        with pytest.raises(RuntimeError):
            async with tx.savepoint():
                await tx.end_transaction("c2", "DeliveryCompleted", NOW)
                assert await tx.count("doc") == 1
                assert await tx.transaction_ended("c2") == "DeliveryCompleted"
                raise RuntimeError("the handler failed")
        assert await tx.ended_transactions(["c1", "c2"]) == {"c1": "DeliveryFailed"}
    async with store.transaction() as tx:
        assert await tx.ended_transactions(["c1", "c2"]) == {"c1": "DeliveryFailed"}


async def test_a_field_named_with_underscores_and_digits_can_be_queried(store: Store) -> None:
    # given documents with a field whose name is an identifier with '_' and a digit
    async with store.transaction() as tx:
        await tx.put("drone", "a", {"home_base_2": "north"})
        await tx.put("drone", "b", {"home_base_2": "south"})

    # then find and count filter on it
    async with store.transaction() as tx:
        assert [key for key, _ in await tx.find("drone", {"home_base_2": "north"})] == ["a"]
        assert await tx.count("drone", {"home_base_2": "south"}) == 1


async def test_batched_lookups_find_every_one_of_more_ids_than_one_statement_takes(
    store: Store,
) -> None:
    # given 1,201 events remembered and as many transactions ended (a store may ask for them in
    # chunks: this is more than two of the SQLite store's 500)
    ids = [f"e{n:04}" for n in range(1201)]
    async with store.transaction() as tx:
        for event_id in ids:
            await tx.remember(event_id, NOW)
            await tx.end_transaction(f"c-{event_id}", "Delivered", NOW)

    # then one lookup of all of them, and one more, finds each
    async with store.transaction() as tx:
        assert await tx.seen_many([*ids, "never"]) == set(ids)
        ended = await tx.ended_transactions([f"c-{event_id}" for event_id in [*ids, "never"]])
        assert ended == {f"c-{event_id}": "Delivered" for event_id in ids}
