"""The settings of a PostgreSQL store (what its URL says) and its schema: the tables, the
PL/pgSQL functions that lock per key, and how ``find``'s ``where`` and buffered puts become SQL."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

from choreograph.errors import ConfigurationError
from choreograph.store import Locks
from choreograph.transport import redact

_MAX_IDENTIFIER = 63  # PostgreSQL truncates longer names silently; we refuse them instead


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    """What a ``postgresql://`` URL says beyond where the database is."""

    dsn: str = dataclasses.field(repr=False)  # may hold a password
    """The URL asyncpg connects with (our own options removed)."""
    schema: str
    pool_size: int = 5
    locking: Literal["key", "service"] = "key"

    @classmethod
    def from_url(cls, url: str, service: str) -> PostgresSettings:
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ConfigurationError(f"not a PostgreSQL URL: {redact(url)!r}")
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        schema = schema_name(options.pop("schema", "") or service)
        try:
            pool_size = int(options.pop("pool_size", "5"))
        except ValueError:
            raise ConfigurationError(f"pool_size must be a number in {redact(url)!r}") from None
        if pool_size < 1:
            raise ConfigurationError(f"pool_size must be at least 1 in {redact(url)!r}")
        locking = options.pop("locking", "key")
        if locking not in ("key", "service"):
            raise ConfigurationError(f"locking must be key or service in {redact(url)!r}")
        dsn = parts._replace(query=urlencode(options)).geturl()
        return cls(dsn, schema, pool_size, cast('Literal["key", "service"]', locking))


def schema_name(name: str) -> str:
    """``name`` as a plain PostgreSQL identifier: lower case, ``[a-z0-9_]``, not starting with a
    digit (so ``drone-scheduler`` lives in schema ``drone_scheduler``)."""
    cleaned = re.sub(r"[^a-z0-9_]", "_", name.lower())
    if not cleaned or cleaned[0].isdigit():
        cleaned = f"s_{cleaned}"
    if len(cleaned) > _MAX_IDENTIFIER:
        raise ConfigurationError(
            f"schema name {cleaned!r} is longer than {_MAX_IDENTIFIER} characters"
        )
    return cleaned


def _lock_key(*parts: str) -> int:
    """A 64-bit advisory lock key. A collision only makes two unrelated things wait for each
    other, never share data."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# The schema, created under an advisory lock so that replicas starting together do not race on
# the catalog. Text columns sort bytewise (COLLATE "C"), as in SQLite, whatever the database's
# collation: find() returns documents "by key order" everywhere.
_SCHEMA_VERSION = "choreograph store, schema 4"  # 2: ended transactions; 3: per-key locks;
# 4: timers written at the commit
_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.state (
    kind TEXT COLLATE "C" NOT NULL, key TEXT COLLATE "C" NOT NULL, doc JSONB NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX IF NOT EXISTS state_doc ON {s}.state USING GIN (doc jsonb_path_ops);
CREATE TABLE IF NOT EXISTS {s}.inbox (
    event_id TEXT COLLATE "C" PRIMARY KEY, at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS inbox_at ON {s}.inbox (at);
CREATE TABLE IF NOT EXISTS {s}.ended (
    correlation_id TEXT COLLATE "C" PRIMARY KEY, event_type TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS ended_at ON {s}.ended (at);
CREATE TABLE IF NOT EXISTS {s}.outbox (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, id TEXT COLLATE "C" NOT NULL,
    topic TEXT NOT NULL, body BYTEA NOT NULL, due_at DOUBLE PRECISION NOT NULL,
    leased_until DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_due ON {s}.outbox (due_at);
CREATE INDEX IF NOT EXISTS outbox_id ON {s}.outbox (id);
CREATE TABLE IF NOT EXISTS {s}.timers (
    name TEXT COLLATE "C" NOT NULL, key TEXT COLLATE "C" NOT NULL,
    due_at DOUBLE PRECISION NOT NULL, data JSONB NOT NULL, PRIMARY KEY (name, key)
);
CREATE INDEX IF NOT EXISTS timers_due ON {s}.timers (due_at);
CREATE INDEX IF NOT EXISTS timers_key ON {s}.timers (key);

-- Per-key locks. mode: 0 none, 1 wait, 2 try (busy: false), 3 try (find: skip the busy ones).
-- Each function locks, then reads in a statement of its own: in READ COMMITTED a volatile
-- function's statements each take a fresh snapshot, so a read sees what the previous holder of
-- the lock committed.
CREATE OR REPLACE FUNCTION {s}.lock_key(k TEXT, kk TEXT, mode INT) RETURNS BOOLEAN
LANGUAGE plpgsql AS $f$
DECLARE h BIGINT := hashtextextended(k || chr(31) || kk, {seed});
BEGIN
    IF mode = 1 THEN
        PERFORM pg_advisory_xact_lock(h);
    ELSIF mode >= 2 THEN
        RETURN pg_try_advisory_xact_lock(h);
    END IF;
    RETURN true;
END $f$;

CREATE OR REPLACE FUNCTION {s}.lock_keys(ks TEXT[], kks TEXT[]) RETURNS INT
LANGUAGE plpgsql AS $f$
BEGIN  -- in the order given (the caller sorts): whoever waits here waits in one global order
    FOR i IN 1 .. coalesce(array_length(ks, 1), 0) LOOP
        PERFORM {s}.lock_key(ks[i], kks[i], 1);
    END LOOP;
    RETURN coalesce(array_length(ks, 1), 0);
END $f$;

CREATE OR REPLACE FUNCTION {s}.get_doc(k TEXT, kk TEXT, mode INT, OUT ok BOOLEAN, OUT got JSONB)
LANGUAGE plpgsql AS $f$
BEGIN
    ok := {s}.lock_key(k, kk, mode);
    IF ok THEN
        SELECT s.doc INTO got FROM {s}.state AS s WHERE s.kind = k AND s.key = kk;
    END IF;
END $f$;

CREATE OR REPLACE FUNCTION {s}.put_doc(k TEXT, kk TEXT, d JSONB, mode INT) RETURNS BOOLEAN
LANGUAGE plpgsql AS $f$
BEGIN
    IF NOT {s}.lock_key(k, kk, mode) THEN
        RETURN false;
    END IF;
    INSERT INTO {s}.state (kind, key, doc) VALUES (k, kk, d)
        ON CONFLICT (kind, key) DO UPDATE SET doc = EXCLUDED.doc;
    RETURN true;
END $f$;

CREATE OR REPLACE FUNCTION {s}.delete_doc(k TEXT, kk TEXT, mode INT) RETURNS INT
LANGUAGE plpgsql AS $f$
DECLARE n INT;
BEGIN
    IF NOT {s}.lock_key(k, kk, mode) THEN
        RETURN -1;
    END IF;
    DELETE FROM {s}.state AS s WHERE s.kind = k AND s.key = kk;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $f$;

CREATE OR REPLACE FUNCTION {s}.matches(d JSONB, scalars JSONB, nulls TEXT[], exact JSONB)
RETURNS BOOLEAN LANGUAGE sql IMMUTABLE AS $f$
    SELECT d @> scalars
        AND NOT EXISTS (
            SELECT 1 FROM unnest(nulls) AS f WHERE coalesce(d -> f, 'null') <> 'null')
        AND NOT EXISTS (
            SELECT 1 FROM jsonb_each(exact) AS e WHERE (d -> e.key) IS DISTINCT FROM e.value)
$f$;

-- Matching documents in key order, each locked and matched again once locked. A busy one ends
-- the search (busy = true, for the caller to raise) unless mode 3 skips it.
CREATE OR REPLACE FUNCTION {s}.find_docs(
    k TEXT, scalars JSONB, nulls TEXT[], exact JSONB, lim INT, mode INT
) RETURNS TABLE (found_key TEXT, found_doc JSONB, busy BOOLEAN)
LANGUAGE plpgsql AS $f$
DECLARE
    candidate TEXT;
    taken INT := 0;
BEGIN
    IF lim <= 0 THEN
        RETURN;
    END IF;
    FOR candidate IN
        SELECT s.key FROM {s}.state AS s
        WHERE s.kind = k AND s.doc @> scalars AND {s}.matches(s.doc, scalars, nulls, exact)
        ORDER BY s.key
    LOOP
        IF NOT {s}.lock_key(k, candidate, mode) THEN
            CONTINUE WHEN mode = 3;
            found_key := candidate;
            found_doc := NULL;
            busy := true;
            RETURN NEXT;
            RETURN;
        END IF;
        SELECT s.doc INTO found_doc FROM {s}.state AS s
        WHERE s.kind = k AND s.key = candidate AND {s}.matches(s.doc, scalars, nulls, exact);
        IF FOUND THEN
            found_key := candidate;
            busy := false;
            RETURN NEXT;
            taken := taken + 1;
            EXIT WHEN taken >= lim;
        END IF;
    END LOOP;
END $f$;

-- The ends of many correlation ids, each locked (in the order given: the caller sorts); a busy
-- one ends the list (busy = true).
CREATE OR REPLACE FUNCTION {s}.ended_types(cs TEXT[], mode INT)
RETURNS TABLE (correlation_id TEXT, event_type TEXT, busy BOOLEAN)
LANGUAGE plpgsql AS $f$
DECLARE c TEXT;
BEGIN
    FOREACH c IN ARRAY cs LOOP
        IF NOT {s}.lock_key(chr(1) || 'ended', c, mode) THEN
            correlation_id := c;
            event_type := NULL;
            busy := true;
            RETURN NEXT;
            RETURN;
        END IF;
    END LOOP;
    -- after every lock is taken: a fresh snapshot sees what their previous holders committed
    RETURN QUERY SELECT e.correlation_id::TEXT, e.event_type, false
        FROM {s}.ended AS e WHERE e.correlation_id = ANY(cs);
END $f$;

CREATE OR REPLACE FUNCTION {s}.end_transaction(c TEXT, t TEXT, at_ DOUBLE PRECISION, mode INT)
RETURNS BOOLEAN LANGUAGE plpgsql AS $f$
BEGIN
    IF NOT {s}.lock_key(chr(1) || 'ended', c, mode) THEN
        RETURN false;
    END IF;
    INSERT INTO {s}.ended (correlation_id, event_type, at) VALUES (c, t, at_)
        ON CONFLICT DO NOTHING;
    RETURN true;
END $f$;

-- The names of a key's timers, once they are locked (set and cancelled by the transaction in
-- memory, written at its commit).
CREATE OR REPLACE FUNCTION {s}.timer_names(kk TEXT, mode INT, OUT ok BOOLEAN, OUT names TEXT[])
LANGUAGE plpgsql AS $f$
BEGIN
    ok := {s}.lock_key(chr(1) || 'timers', kk, mode);
    IF ok THEN
        names := ARRAY(SELECT t.name::TEXT FROM {s}.timers AS t WHERE t.key = kk);
    END IF;
END $f$;

-- Due timers, earliest first, skipping those another transaction holds (the row, or the key's
-- timers in a handling that sets or cancels them).
CREATE OR REPLACE FUNCTION {s}.take_timers(now_ DOUBLE PRECISION, lim INT, mode INT)
RETURNS SETOF {s}.timers LANGUAGE plpgsql AS $f$
DECLARE t {s}.timers;
BEGIN
    FOR t IN
        SELECT * FROM {s}.timers AS x WHERE x.due_at <= now_ ORDER BY x.due_at LIMIT lim
        FOR UPDATE SKIP LOCKED
    LOOP
        CONTINUE WHEN NOT {s}.lock_key(
            chr(1) || 'timers', t.key, CASE mode WHEN 0 THEN 0 ELSE 3 END);
        DELETE FROM {s}.timers AS x WHERE x.name = t.name AND x.key = t.key;
        RETURN NEXT t;
    END LOOP;
END $f$;

COMMENT ON SCHEMA {s} IS '{version}';
"""


def _puts_sql(s: str, kinds: str, keys: str, docs: str) -> str:
    """Two common table expressions writing the buffered puts (``kinds``, ``keys`` and ``docs``,
    JSON text, are the placeholders of three arrays): documents into ``state``, and the ends of
    transactions (kind ``_ENDED``, doc ``[event_type, at]``) into ``ended``."""
    rows = f"unnest({kinds}::text[], {keys}::text[], {docs}::text[]) AS u(k, kk, d)"
    return (
        f"put_ended AS (INSERT INTO {s}.ended (correlation_id, event_type, at) "
        f"SELECT kk, d::jsonb ->> 0, (d::jsonb ->> 1)::float8 FROM {rows} "
        "WHERE k = chr(1) || 'ended' ON CONFLICT DO NOTHING), "
        f"put_docs AS (INSERT INTO {s}.state (kind, key, doc) SELECT k, kk, d::jsonb FROM {rows} "
        "WHERE k <> chr(1) || 'ended' ON CONFLICT (kind, key) DO UPDATE SET doc = EXCLUDED.doc)"
    )


def _timers_sql(s: str, names: str, keys: str, data: str) -> str:
    """Two common table expressions writing the timers a transaction set and cancelled
    (``names``, ``keys`` and ``data`` are the placeholders of three arrays; ``data`` is the JSON
    text of ``[due_at, data]``, or null for a timer to delete)."""
    rows = f"unnest({names}::text[], {keys}::text[], {data}::text[]) AS u(n, kk, d)"
    return (
        f"timers_gone AS (DELETE FROM {s}.timers AS t USING {rows} "
        "WHERE u.d IS NULL AND t.name = u.n AND t.key = u.kk), "
        f"timers_set AS (INSERT INTO {s}.timers (name, key, due_at, data) "
        f"SELECT n, kk, (d::jsonb ->> 0)::float8, d::jsonb -> 1 FROM {rows} WHERE d IS NOT NULL "
        "ON CONFLICT (name, key) DO UPDATE SET due_at = EXCLUDED.due_at, data = EXCLUDED.data)"
    )


#: Lock names of what is not a document (the functions above spell them the same way).
_ENDED = "\x01ended"
_TIMERS = "\x01timers"
_MODES: dict[Locks, int] = {"none": 0, "wait": 1, "raise": 2}


@dataclass(frozen=True, slots=True)
class _Where:
    """``find``'s ``where`` as the ``matches`` function takes it: scalars (compared by
    containment, which can use the GIN index), fields that must be null or missing, and fields
    compared for equality (lists and objects, for which containment is not equality)."""

    scalars: dict[str, Any]
    nulls: list[str]
    exact: dict[str, Any]

    @classmethod
    def of(cls, where: dict[str, Any] | None) -> _Where:
        scalars: dict[str, Any] = {}
        nulls: list[str] = []
        exact: dict[str, Any] = {}
        for field, value in (where or {}).items():
            if not field.replace("_", "").isalnum():
                raise ValueError(f"invalid field name {field!r}")
            if value is None:
                nulls.append(field)
            elif isinstance(value, dict | list):
                exact[field] = value
            else:
                scalars[field] = value
        return cls(scalars, nulls, exact)
