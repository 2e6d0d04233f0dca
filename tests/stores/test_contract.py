"""The store contract (:mod:`choreograph.store`), checked the same way against every store."""

from __future__ import annotations

import pytest

from choreograph.store import OutboxRow, Store, Timer
from tests.stores.conftest import StoreFactory

NOW = 1_000_000.0


class Boom(Exception):
    pass


def rows(*ids: str, due_at: float = 0.0) -> list[OutboxRow]:
    return [OutboxRow(i, f"topic.{i}", f"body {i}".encode(), due_at) for i in ids]


def ids(items: list[OutboxRow]) -> list[str]:
    return [r.id for r in items]


def timer(name: str, key: str, due_at: float, **data: object) -> Timer:
    return Timer(name, key, due_at, dict(data))


# state ---------------------------------------------------------------------------------------


async def test_put_then_get_returns_the_document(store: Store) -> None:
    doc = {"name": "Zoë", "n": 3, "ok": True, "nested": {"list": [1, 2.5, None]}}
    async with store.transaction() as tx:
        await tx.put("drone", "d1", doc)
    async with store.transaction() as tx:
        assert await tx.get("drone", "d1") == doc
        assert await tx.get("drone", "d2") is None
        assert await tx.get("other", "d1") is None


async def test_put_replaces_the_whole_document(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.put("drone", "d1", {"a": 1, "b": 2})
        await tx.put("drone", "d1", {"a": 3})
        assert await tx.get("drone", "d1") == {"a": 3}


async def test_delete_says_whether_the_document_existed(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.put("drone", "d1", {})
        assert await tx.delete("drone", "d1") is True
        assert await tx.delete("drone", "d1") is False
        assert await tx.get("drone", "d1") is None


async def test_find_filters_on_top_level_fields_in_key_order(store: Store) -> None:
    async with store.transaction() as tx:
        for key, status in [("d3", "free"), ("d1", "free"), ("d2", "busy"), ("D0", "free")]:
            await tx.put("drone", key, {"status": status, "base": "north"})
        await tx.put("pad", "p1", {"status": "free"})

        free = await tx.find("drone", {"status": "free"})
        assert [k for k, _ in free] == ["D0", "d1", "d3"]  # bytewise order, as in SQLite
        assert free[1] == ("d1", {"status": "free", "base": "north"})
        assert [k for k, _ in await tx.find("drone", {"status": "free"}, limit=2)] == ["D0", "d1"]
        assert len(await tx.find("drone")) == 4
        assert await tx.find("drone", {"status": "free", "base": "south"}) == []
        assert await tx.find("hangar") == []


async def test_find_matches_numbers_booleans_and_missing_fields(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.put("drone", "a", {"range": 10, "active": True})
        await tx.put("drone", "b", {"range": 12.5, "active": False, "pilot": None})
        await tx.put("drone", "c", {"range": 10})

        assert [k for k, _ in await tx.find("drone", {"range": 10})] == ["a", "c"]
        assert [k for k, _ in await tx.find("drone", {"range": 12.5})] == ["b"]
        assert [k for k, _ in await tx.find("drone", {"active": True})] == ["a"]
        assert [k for k, _ in await tx.find("drone", {"active": False})] == ["b"]
        # None matches a null field and a missing one alike
        assert [k for k, _ in await tx.find("drone", {"pilot": None})] == ["a", "b", "c"]


async def test_find_refuses_field_names_that_are_not_identifiers(store: Store) -> None:
    async with store.transaction() as tx:
        with pytest.raises(ValueError, match="invalid field name"):
            await tx.find("drone", {"status') OR 1=1 --": "x"})


async def test_count_with_and_without_where(store: Store) -> None:
    async with store.transaction() as tx:
        for i in range(5):
            await tx.put("drone", f"d{i}", {"status": "free" if i % 2 else "busy"})
        assert await tx.count("drone") == 5
        assert await tx.count("drone", {"status": "free"}) == 2
        assert await tx.count("drone", {"status": "gone"}) == 0
        assert await tx.count("pad") == 0


# transactions and savepoints -----------------------------------------------------------------


async def test_an_exception_discards_the_whole_transaction(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.put("drone", "kept", {"v": 1})

    with pytest.raises(Boom):
        async with store.transaction() as tx:
            await tx.put("drone", "kept", {"v": 2})
            await tx.put("drone", "new", {})
            await tx.delete("drone", "kept")
            await tx.remember("e1", NOW)
            await tx.add_outbox(rows("o1"))
            await tx.set_timer(timer("deadline:x", "k", NOW))
            raise Boom

    async with store.transaction() as tx:
        assert await tx.get("drone", "kept") == {"v": 1}
        assert await tx.get("drone", "new") is None
        assert await tx.seen("e1") is False
    assert await store.claim_outbox(NOW, 10, 30) == []
    assert await store.list_timers() == []


async def test_a_failed_savepoint_keeps_the_rest_of_the_transaction(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.put("drone", "before", {})
        with pytest.raises(Boom):
            async with tx.savepoint():
                await tx.put("drone", "inside", {})
                await tx.put("drone", "before", {"changed": True})
                await tx.remember("e1", NOW)
                await tx.add_outbox(rows("o1"))
                await tx.set_timer(timer("t", "k", NOW))
                raise Boom
        async with tx.savepoint():
            await tx.put("drone", "after", {})
            await tx.remember("e2", NOW)

    async with store.transaction() as tx:
        assert await tx.get("drone", "before") == {}
        assert await tx.get("drone", "inside") is None
        assert await tx.get("drone", "after") == {}
        assert (await tx.seen("e1"), await tx.seen("e2")) == (False, True)
    assert await store.claim_outbox(NOW, 10, 30) == []
    assert await store.list_timers() == []


async def test_savepoints_nest_and_follow_one_another(store: Store) -> None:
    async with store.transaction() as tx:
        for i in range(3):
            async with tx.savepoint():
                await tx.put("n", f"outer{i}", {})
                with pytest.raises(Boom):
                    async with tx.savepoint():
                        await tx.put("n", f"inner{i}", {})
                        raise Boom
        assert [k for k, _ in await tx.find("n")] == ["outer0", "outer1", "outer2"]


async def test_a_failed_savepoint_discards_what_it_only_recorded(store: Store) -> None:
    async with store.transaction() as tx:
        with pytest.raises(Boom):
            async with tx.savepoint():
                await tx.remember("e1", NOW)
                await tx.add_outbox(rows("o1"))
                raise Boom
        async with tx.savepoint():
            await tx.remember("e2", NOW)
            await tx.add_outbox(rows("o2"))
        assert (await tx.seen("e1"), await tx.seen("e2")) == (False, True)

    async with store.transaction() as tx:
        assert (await tx.seen("e1"), await tx.seen("e2")) == (False, True)
    assert ids(await store.claim_outbox(NOW, 10, 30)) == ["o2"]


async def test_a_failed_outer_savepoint_discards_its_successful_inner_ones(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.add_outbox(rows("before"))
        with pytest.raises(Boom):
            async with tx.savepoint():
                await tx.add_outbox(rows("outer"))
                async with tx.savepoint():
                    await tx.put("n", "inner", {})
                    await tx.add_outbox(rows("inner"))
                with pytest.raises(Boom):
                    async with tx.savepoint():
                        await tx.put("n", "failed", {})
                        raise Boom
                await tx.put("n", "outer", {})
                raise Boom
        await tx.put("n", "after", {})
        assert [k for k, _ in await tx.find("n")] == ["after"]
    assert ids(await store.claim_outbox(NOW, 10, 30)) == ["before"]


# inbox ---------------------------------------------------------------------------------------


async def test_inbox_remembers_event_ids(store: Store) -> None:
    async with store.transaction() as tx:
        assert await tx.seen("e1") is False
        await tx.remember("e1", NOW)
        await tx.remember("e1", NOW + 1)  # remembering twice is harmless
        assert await tx.seen("e1") is True
    async with store.transaction() as tx:
        assert await tx.seen("e1") is True
        assert await tx.seen("e2") is False


async def test_prune_inbox_forgets_only_ids_older_than_the_horizon(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.remember("old1", NOW - 100)
        await tx.remember("old2", NOW - 50)
        await tx.remember("fresh", NOW)

    assert await store.prune_inbox(NOW - 10) == 2
    assert await store.prune_inbox(NOW - 10) == 0

    async with store.transaction() as tx:
        assert [await tx.seen(e) for e in ("old1", "old2", "fresh")] == [False, False, True]


# outbox --------------------------------------------------------------------------------------


async def test_claim_outbox_returns_due_rows_in_insertion_order(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.add_outbox(rows("b", "a"))
        await tx.add_outbox(rows("later", due_at=NOW + 10))
        await tx.add_outbox(rows("c"))

    claimed = await store.claim_outbox(NOW, 10, 30)

    assert claimed == rows("b", "a", "c")
    assert ids(await store.claim_outbox(NOW + 10, 10, 30)) == ["later"]


async def test_claim_outbox_keeps_bytes_intact(store: Store) -> None:
    body = bytes(range(256)) * 4
    async with store.transaction() as tx:
        await tx.add_outbox([OutboxRow("x", "t", body, 0.0)])
    assert (await store.claim_outbox(NOW, 1, 30))[0].body == body


async def test_claimed_rows_are_leased_until_the_lease_ends(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.add_outbox(rows("a", "b", "c"))

    first = await store.claim_outbox(NOW, 2, lease=30)
    second = await store.claim_outbox(NOW + 1, 10, lease=30)
    after_lease = await store.claim_outbox(NOW + 30.5, 10, lease=30)

    assert (ids(first), ids(second), ids(after_lease)) == (["a", "b"], ["c"], ["a", "b"])


async def test_fast_path_rows_are_left_alone_until_claimed_until(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.add_outbox(rows("fast"), claimed_until=NOW + 10)

    assert await store.claim_outbox(NOW, 10, 30) == []
    assert ids(await store.claim_outbox(NOW + 10, 10, 30)) == ["fast"]


async def test_sent_and_forgotten_rows_are_gone(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.add_outbox(rows("a", "b", "c", "d"), claimed_until=NOW + 10)

    await store.mark_sent(["a"])
    await store.mark_sent([])
    async with store.transaction() as tx:
        await tx.forget_outbox(["b", "unknown"])
        await tx.forget_outbox([])

    assert ids(await store.claim_outbox(NOW + 10, 10, 30)) == ["c", "d"]


async def test_a_batch_of_hundreds_of_rows(store: Store) -> None:
    batch = rows(*(f"r{i:04}" for i in range(500)))
    async with store.transaction() as tx:
        await tx.add_outbox(batch)
    claimed = await store.claim_outbox(NOW, 1000, 30)
    assert claimed == batch
    await store.mark_sent(ids(claimed))
    assert await store.claim_outbox(NOW + 60, 1000, 30) == []


# timers --------------------------------------------------------------------------------------


async def test_set_timer_replaces_the_same_name_and_key(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.set_timer(timer("deadline:a", "k1", NOW + 5, attempt=1))
        await tx.set_timer(timer("deadline:a", "k1", NOW + 9, attempt=2))
        await tx.set_timer(timer("deadline:b", "k1", NOW + 7))

    assert await store.list_timers("k1") == [
        timer("deadline:b", "k1", NOW + 7),
        timer("deadline:a", "k1", NOW + 9, attempt=2),
    ]


async def test_cancel_timers_by_key_and_by_names(store: Store) -> None:
    async with store.transaction() as tx:
        for name in ("deadline:a", "deadline:b", "join:c"):
            await tx.set_timer(timer(name, "k1", NOW))
            await tx.set_timer(timer(name, "k2", NOW))

    async with store.transaction() as tx:
        assert await tx.cancel_timers("k1", ["deadline:a", "join:c", "deadline:zzz"]) == 2
        assert await tx.cancel_timers("k2") == 3
        assert await tx.cancel_timers("k3") == 0

    assert await store.list_timers() == [timer("deadline:b", "k1", NOW)]


async def test_a_failed_savepoint_takes_back_its_timers_the_others_stay(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.set_timer(timer("deadline:a", "k1", NOW + 1))
        await tx.set_timer(timer("deadline:b", "k1", NOW + 2))
    async with store.transaction() as tx:
        async with tx.savepoint():  # succeeds: cancels a, sets c (counted by a later cancel)
            assert await tx.cancel_timers("k1", ["deadline:a"]) == 1
            await tx.set_timer(timer("deadline:c", "k1", NOW + 3))
        with pytest.raises(Boom):
            async with tx.savepoint():  # fails: its cancel of b and c and its d are undone
                assert await tx.cancel_timers("k1") == 2
                await tx.set_timer(timer("deadline:d", "k1", NOW + 4))
                raise Boom
        async with tx.savepoint():
            await tx.set_timer(timer("deadline:b", "k1", NOW + 5, attempt=2))
            assert await tx.cancel_timers("k1", ["deadline:a", "deadline:d"]) == 0
        await tx.set_timer(timer("deadline:e", "k2", NOW + 6))

    assert await store.list_timers() == [
        timer("deadline:c", "k1", NOW + 3),
        timer("deadline:b", "k1", NOW + 5, attempt=2),
        timer("deadline:e", "k2", NOW + 6),
    ]


async def test_a_timer_taken_in_a_transaction_is_no_longer_there_to_cancel(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.set_timer(timer("deadline:a", "k1", NOW - 1))
        await tx.set_timer(timer("deadline:b", "k1", NOW + 10))
    async with store.transaction() as tx:
        assert await tx.cancel_timers("k1", ["deadline:zzz"]) == 0  # the key's timers are known
        assert [t.name for t in await tx.take_due_timers(NOW, 10)] == ["deadline:a"]
        assert await tx.cancel_timers("k1") == 1
    assert await store.list_timers() == []


async def test_take_due_timers_removes_and_returns_due_ones_earliest_first(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.set_timer(timer("t", "late", NOW + 10))
        await tx.set_timer(timer("t", "second", NOW - 1, n=2))
        await tx.set_timer(timer("t", "first", NOW - 5, n=1))
        await tx.set_timer(timer("t", "now", NOW))

    async with store.transaction() as tx:
        taken = await tx.take_due_timers(NOW, 2)
        assert taken == [timer("t", "first", NOW - 5, n=1), timer("t", "second", NOW - 1, n=2)]
        assert [t.key for t in await tx.take_due_timers(NOW, 10)] == ["now"]
        assert await tx.take_due_timers(NOW, 10) == []

    assert [t.key for t in await store.list_timers()] == ["late"]


async def test_next_timer_due_is_the_earliest(store: Store) -> None:
    assert await store.next_timer_due() is None
    async with store.transaction() as tx:
        await tx.set_timer(timer("t", "a", NOW + 3))
        await tx.set_timer(timer("t", "b", NOW + 1.5))
    assert await store.next_timer_due() == NOW + 1.5


async def test_list_timers_by_key_earliest_first_with_a_limit(store: Store) -> None:
    async with store.transaction() as tx:
        for i in range(5):
            await tx.set_timer(timer(f"t{i}", "k1", NOW + 5 - i))
        await tx.set_timer(timer("t", "k2", NOW))

    assert [t.name for t in await store.list_timers("k1")] == ["t4", "t3", "t2", "t1", "t0"]
    assert [t.name for t in await store.list_timers("k1", limit=2)] == ["t4", "t3"]
    assert [t.key for t in await store.list_timers(limit=2)] == ["k2", "k1"]
    assert await store.list_timers("k3") == []


async def test_cancel_timer_says_whether_it_was_pending(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.set_timer(timer("t", "k", NOW))
    assert await store.cancel_timer("t", "k") is True
    assert await store.cancel_timer("t", "k") is False
    assert await store.list_timers() == []


# durability ----------------------------------------------------------------------------------


async def test_a_reopened_store_keeps_everything(store_name: str, make_store: StoreFactory) -> None:
    if store_name == "memory":
        pytest.skip("memory:// lives and dies with its store object")
    first = await make_store()
    async with first.transaction() as tx:
        await tx.put("drone", "d1", {"status": "free"})
        await tx.remember("e1", NOW)
        await tx.add_outbox(rows("o1"))
        await tx.set_timer(timer("t", "k", NOW, n=1))
    await first.close()

    second = await make_store()

    async with second.transaction() as tx:
        assert await tx.get("drone", "d1") == {"status": "free"}
        assert await tx.seen("e1") is True
    assert ids(await second.claim_outbox(NOW, 10, 30)) == ["o1"]
    assert await second.list_timers() == [timer("t", "k", NOW, n=1)]


async def test_open_and_close_are_idempotent(make_store: StoreFactory, store_name: str) -> None:
    # given an opened store holding a document
    store = await make_store()
    async with store.transaction() as tx:
        await tx.put("k", "1", {"v": 1})

    # when it is opened a second time
    await store.open()

    # then it still holds the document and still takes writes
    async with store.transaction() as tx:
        assert await tx.get("k", "1") == {"v": 1}
        await tx.put("k", "2", {"v": 2})

    # when it is closed twice
    await store.close()
    await store.close()

    # then nothing was lost: a durable store opened again finds both documents
    if store_name != "memory":
        again = await make_store()
        async with again.transaction() as tx:
            assert await tx.get("k", "1") == {"v": 1}
            assert await tx.get("k", "2") == {"v": 2}


async def test_batched_lookups_answer_as_the_single_ones(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.remember("committed", NOW)
        await tx.end_transaction("c-ended", "Delivered", NOW)
    async with store.transaction() as tx:
        await tx.remember("this-tx", NOW)
        ids = ["committed", "this-tx", "never", "committed"]
        assert await tx.seen_many(ids) == {"committed", "this-tx"}
        assert await tx.seen_many([]) == set()
        ended = await tx.ended_transactions(["c-ended", "c-open"])
        assert ended == {"c-ended": "Delivered"}
        assert await tx.ended_transactions([]) == {}


async def test_a_query_by_a_field_works_after_the_transaction_that_first_asked_rolled_back(
    store: Store,
) -> None:
    with pytest.raises(Boom):
        async with store.transaction() as tx:
            await tx.put("drone", "d1", {"base": "north"})
            assert await tx.find("drone", {"base": "north"}) == [("d1", {"base": "north"})]
            raise Boom
    async with store.transaction() as tx:
        await tx.put("drone", "d2", {"base": "north"})
        assert await tx.find("drone", {"base": "north"}) == [("d2", {"base": "north"})]
        assert await tx.count("drone", {"base": "north"}) == 1
