"""``postgresql://user@host:port/db?schema=NAME`` service stores (``postgres://`` too).

Each service owns one schema (default: its name, sanitized) holding the same five tables as the
SQLite store: ``state``, ``inbox``, ``ended``, ``outbox`` and ``timers``. Replicas of a service
share it.

Concurrency (``locking=key``, the default): replicas and lanes of a service run their
transactions at the same time, each locking what it touches, per key, until it ends:

- a document (``get``, ``put``, ``delete``, each document ``find`` returns, matched again once
  locked), absent ones included (a read-modify-write of a new document loses no update);
- a correlation id's end (``transaction_ended``, ``end_transaction``): a late event and the
  terminal event of one transaction never run at the same time;
- the timers of a key (``set_timer``, ``cancel_timers``);
- an event id (``seen`` inserts it into the inbox at once: a replica handling the same event
  waits on that row and then sees it handled, or takes over if the first rolled back).

Locks are transaction-scoped advisory locks on a hash of ``(kind, key)`` (a collision only makes
two unrelated keys wait for each other), taken by small PL/pgSQL functions of the schema that
lock first and read afterwards, in the same round trip, so that a read always sees what the
previous holder committed. A worker's transactions use ``locks="raise"``: what is busy raises
:class:`~choreograph.store.DocumentBusy` instead of waiting, so they never wait while holding
anything and never deadlock; the worker handles that message again after the commit, in a
transaction that first waits for what was busy (``lock_first``, taken in one global order).
``find(..., skip_locked=True)`` reserves one of many without waiting at all. ``claim_outbox``
and ``take_due_timers`` skip rows another replica holds (``FOR UPDATE SKIP LOCKED``).

``locking=service`` keeps the former scheme: one advisory lock per service for every
transaction, so that all lanes and replicas of a service run one after the other (to compare).

The service's own tables live in its schema too: every connection's ``search_path`` starts with
it, so a handler's unqualified ``INSERT INTO parcels`` on ``ctx.connection`` (or a SQLAlchemy model
without a schema on ``ctx.session``) reaches the service's table. See ``docs/guide/tables.md``.
Statements a handler runs there take the locks it asks for (row locks wait; use ``SKIP LOCKED``
or ``NOWAIT`` where replicas compete, or lock the same rows in one order).

URL options: ``schema``, ``pool_size`` (most connections of one store, default 5), ``locking``
(``key`` or ``service``); all others are passed to asyncpg (e.g. ``sslmode``).
"""

from __future__ import annotations

from choreograph.stores.postgres._schema import PostgresSettings, schema_name
from choreograph.stores.postgres._store import PostgresStore
from choreograph.stores.postgres._tx import StoreConnection

__all__ = ["PostgresSettings", "PostgresStore", "StoreConnection", "schema_name"]
