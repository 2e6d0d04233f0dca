"""``read_ahead``: documents read for a batch's handlings in one go are what ``get`` returns,
until the transaction changes them, and a document another transaction holds is not read."""

from __future__ import annotations

import pytest

from choreograph.store import DocumentBusy, Store
from tests.stores.conftest import is_postgres


async def test_a_document_read_ahead_is_what_get_returns_until_it_changes(store: Store) -> None:
    async with store.transaction() as tx:
        await tx.put("delivery", "a", {"status": "requested"})
        await tx.put("delivery", "c", {"status": "requested"})

    async with store.transaction(locks="raise") as tx:
        # when a batch reads three documents ahead, one of them absent
        busy = await tx.read_ahead([("delivery", "a"), ("delivery", "b"), ("delivery", "c")])
        assert busy == set()
        # then get returns each as stored, and a handler changing the dict it got changes
        # nothing the next get returns
        got = await tx.get("delivery", "a")
        assert got == {"status": "requested"}
        got["status"] = "changed in place"
        assert await tx.get("delivery", "a") == {"status": "requested"}
        assert await tx.get("delivery", "b") is None
        # and what the transaction writes afterwards wins over what was read
        await tx.put("delivery", "b", {"status": "new"})
        assert await tx.get("delivery", "b") == {"status": "new"}
        assert await tx.delete("delivery", "c")
        assert await tx.get("delivery", "c") is None
        # also in a savepoint that rolls back: the document is as before it
        with pytest.raises(RuntimeError):
            async with tx.savepoint():
                await tx.put("delivery", "a", {"status": "rolled back"})
                raise RuntimeError("this handling fails")
        assert await tx.get("delivery", "a") == {"status": "requested"}

    async with store.transaction() as tx:
        assert await tx.get("delivery", "b") == {"status": "new"}
        assert await tx.get("delivery", "c") is None


async def test_a_document_another_transaction_holds_is_busy_and_not_read(
    store_name: str, replicas: tuple[Store, Store]
) -> None:
    if not is_postgres(store_name):
        pytest.skip("only PostgreSQL locks per document (the others run one writer at a time)")
    first, second = replicas
    async with first.transaction() as tx:
        await tx.put("delivery", "held", {"n": 1})
        await tx.put("delivery", "free", {"n": 2})
    async with first.transaction(locks="raise") as holder:
        assert await holder.get("delivery", "held") == {"n": 1}
        async with second.transaction(locks="raise") as tx:
            # when another replica reads ahead what the first holds, and another document
            busy = await tx.read_ahead([("delivery", "held"), ("delivery", "free")])
            # then the held one is busy, not read (get still finds it busy), the other read
            assert busy == {("delivery", "held")}
            assert await tx.get("delivery", "free") == {"n": 2}
            with pytest.raises(DocumentBusy):
                await tx.get("delivery", "held")


async def test_a_document_read_ahead_stays_locked_for_the_transaction(
    store_name: str, replicas: tuple[Store, Store]
) -> None:
    if not is_postgres(store_name):
        pytest.skip("only PostgreSQL locks per document (the others run one writer at a time)")
    first, second = replicas
    async with first.transaction(locks="raise") as tx:
        # given a document read ahead and not got yet
        assert await tx.read_ahead([("delivery", "d")]) == set()
        # then another replica finds it busy until this transaction ends
        async with second.transaction(locks="raise") as other:
            with pytest.raises(DocumentBusy):
                await other.get("delivery", "d")
            assert await other.read_ahead([("delivery", "d")]) == {("delivery", "d")}
        await tx.put("delivery", "d", {"n": 1})
    async with second.transaction(locks="raise") as other:
        assert await other.get("delivery", "d") == {"n": 1}
