"""The console's queries on the recorder database (SQLite and PostgreSQL), its search filters,
and its session, CSRF and exposure rules, without a browser."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from choreograph.console import ConsoleSettings, create_console_app, queries
from choreograph.console.queries import (
    PAGE_SIZE,
    BadFilter,
    TxFilter,
    edge_counts,
    search_transactions,
    service_activity,
    transaction_counts,
)
from choreograph.console.security import Signer, new_session
from choreograph.demo import create_app
from choreograph.envelope import Envelope, encode, new_id
from choreograph.errors import ConfigurationError
from choreograph.observe.recorder import REPORTS_TOPIC, Recorder
from choreograph.transport import Delivery, Message

T0 = 1_800_000_000.0  # 2027-01-15, a fixed clock for every recorded time


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


class Recording:
    """Builds deliveries' events and handling reports and records them, as the recorder would."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.batch: list[Delivery] = []
        self.reports: list[dict[str, Any]] = []

    def event(self, cid: str, kind: str, at: float, cause: Envelope | None = None,
              source: str = "test", **data: Any) -> Envelope:  # fmt: skip
        envelope = Envelope(new_id(), kind, source, cid, {"delivery_id": cid, **data},
                            time=_iso(at), causationid=cause.id if cause else None)  # fmt: skip
        self.batch.append(Delivery(Message(envelope.id, kind, encode(envelope)), 1))
        return envelope

    def handled(self, envelope: Envelope, service: str, at: float, outcome: str = "done",
                kind: str = "handler") -> None:  # fmt: skip
        self.reports.append({
            "id": new_id(), "event_id": envelope.id, "event_type": envelope.type,
            "correlation_id": envelope.correlationid, "service": service, "handler": "h",
            "kind": kind, "attempt": 1, "outcome": outcome, "emitted": [],
            "started": at, "ended": at + 0.001,
        })  # fmt: skip

    async def flush(self) -> None:
        reports = Envelope(new_id(), REPORTS_TOPIC, "test", new_id(), {"reports": self.reports})
        self.batch.append(Delivery(Message(reports.id, REPORTS_TOPIC, encode(reports)), 1))
        assert await self.recorder.record(self.batch) == []
        self.batch, self.reports = [], []


@pytest.fixture
async def recorded(recorder_db_url: str) -> AsyncIterator[Recorder]:
    async with _scenario(recorder_db_url) as recorder:
        yield recorder


@pytest.fixture
async def recorded_sqlite(tmp_path: Path) -> AsyncIterator[str]:
    url = f"sqlite:///{tmp_path}/flows.db"
    async with _scenario(url):
        yield url


@contextlib.asynccontextmanager
async def _scenario(db_url: str) -> AsyncIterator[Recorder]:
    """Given four deliveries: completed (with a retry), failed (compensated), still open, and
    completed before one of its steps arrived (late)."""
    recorder = Recorder(create_app(), "memory://", db_url)
    await recorder.db.open()
    r = Recording(recorder)
    requested = r.event("d-001-done", "DeliveryRequested", T0, package_id="p-001")
    r.handled(requested, "package", T0, outcome="retry")
    r.handled(requested, "package", T0 + 1)
    ready = r.event("d-001-done", "PackageReady", T0 + 1, requested, "package", package_id="p-001")
    r.handled(ready, "delivery", T0 + 2)
    r.event("d-001-done", "DeliveryCompleted", T0 + 3, ready, "delivery")
    failed_request = r.event("d-002-fail", "DeliveryRequested", T0 + 10, package_id="p-002")
    rejected = r.event("d-002-fail", "PackageRejected", T0 + 11, failed_request, "package")
    failed = r.event("d-002-fail", "DeliveryFailed", T0 + 12, rejected, "delivery")
    r.handled(failed, "package", T0 + 13, kind="compensation")
    r.event("d-003-open", "DeliveryRequested", T0 + 20, package_id="p-003")
    late_request = r.event("x-004-late", "DeliveryRequested", T0 + 30, package_id="p-004")
    r.event("x-004-late", "DeliveryCompleted", T0 + 31, late_request, "delivery")
    await r.flush()
    r.event("x-004-late", "DroneScheduled", T0 + 40, late_request, "drone-scheduler")
    await r.flush()
    yield recorder
    await recorder.db.close()


async def _ids(recorder: Recorder, now: float = T0 + 50, **params: str) -> list[str]:
    page = await search_transactions(
        recorder.db, TxFilter.from_params(params), now=now, stuck_after=60.0
    )
    return [row["correlation_id"] for row in page.rows]


async def test_search_by_id_prefix_business_key_field_and_type(recorded: Recorder) -> None:
    assert await _ids(recorded, q="d-002-fail") == ["d-002-fail"]
    assert await _ids(recorded, q="d-00") == ["d-003-open", "d-002-fail", "d-001-done"]
    assert await _ids(recorded, q="p-004") == ["x-004-late"]  # a value of a data field
    assert await _ids(recorded, field="package_id=p-001") == ["d-001-done"]
    assert await _ids(recorded, field="delivery_id=p-001") == []
    assert await _ids(recorded, type="PackageRejected") == ["d-002-fail"]
    assert await _ids(recorded, q="nothing-like-it") == []


async def test_a_common_event_type_finds_the_same_page(
    recorded: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given every event type counted as common (the list is walked and each transaction checked)
    monkeypatch.setattr(queries, "COMMON_TYPE", 1)
    # then a search by type, alone or with other filters, finds what reading the type's
    # transactions finds
    assert await _ids(recorded, type="DeliveryRequested") == [
        "x-004-late", "d-003-open", "d-002-fail", "d-001-done"
    ]  # fmt: skip
    assert await _ids(recorded, type="PackageRejected") == ["d-002-fail"]
    assert await _ids(recorded, type="DeliveryCompleted", status="late") == ["x-004-late"]
    assert await _ids(recorded, type="DeliveryRequested", sort="started", dir="asc", q="d-00") == [
        "d-001-done", "d-002-fail", "d-003-open"
    ]  # fmt: skip
    assert await _ids(recorded, type="NoSuchType") == []


async def test_status_filters_and_time_range(recorded: Recorder) -> None:
    assert await _ids(recorded, status="completed") == ["x-004-late", "d-001-done"]
    assert await _ids(recorded, status="failed") == ["d-002-fail"]
    assert await _ids(recorded, status="in_flight") == ["d-003-open"]
    # open and silent for longer than stuck_after (60 s)
    assert await _ids(recorded, status="stuck") == []
    assert await _ids(recorded, now=T0 + 500, status="stuck") == ["d-003-open"]
    assert await _ids(recorded, status="late") == ["x-004-late"]
    range_ = {"from": str(T0 + 5), "to": str(T0 + 25)}
    assert await _ids(recorded, **range_) == ["d-003-open", "d-002-fail"]


async def test_sorting_and_pages(recorded: Recorder) -> None:
    by_events = await search_transactions(recorded.db, TxFilter(sort="events", descending=False))
    counts = [row["events"] for row in by_events.rows]
    assert counts == sorted(counts) and counts[0] == 1 and counts[-1] == 3
    oldest_first = await _ids(recorded, sort="started", dir="asc")
    assert oldest_first == ["d-001-done", "d-002-fail", "d-003-open", "x-004-late"]
    # given more transactions than a page holds
    r = Recording(recorded)
    for number in range(PAGE_SIZE + 3):
        r.event(f"bulk-{number:03d}", "DeliveryRequested", T0 + 100 + number)
    await r.flush()
    first = await search_transactions(recorded.db, TxFilter(q="bulk-"))
    second = await search_transactions(recorded.db, TxFilter(q="bulk-", page=2))
    assert len(first.rows) == PAGE_SIZE and first.more
    assert len(second.rows) == 3 and not second.more
    seen = [r["correlation_id"] for r in first.rows + second.rows]
    assert len(set(seen)) == PAGE_SIZE + 3


async def test_counts_activity_and_edges(recorded: Recorder) -> None:
    counts = await transaction_counts(recorded.db, T0 - 1, now=T0 + 500, stuck_after=60.0)
    assert counts == {"total": 4, "in_flight": 0, "stuck": 1, "completed": 2, "failed": 1,
                      "late": 1}  # fmt: skip
    activity = await service_activity(recorded.db, T0 - 60, now=T0 + 500)
    assert activity["package"]["done"] == 2 and activity["package"]["retry"] == 1
    assert activity["package"]["compensations"] == 1
    # the sparkline's series: a bucket per minute of activity (all in the first minute here)
    assert activity["package"]["series"] == [3]
    assert (activity["package"]["series_from"], activity["package"]["series_step"]) == (T0, 60)
    # up to now while the last activity is less than a minute old: the minute since, quiet
    recent = await service_activity(recorded.db, T0 - 60, now=T0 + 100)
    assert recent["package"]["series"] == [3, 0]
    # handled per second over the last whole minute: two done (the retry does not count)
    assert recent["package"]["per_second"] == round(2 / 60, 2)
    assert activity["package"]["per_second"] == 0.0  # nothing in the minute before T0 + 500
    edges = await edge_counts(recorded.db, T0 - 60)
    assert edges[("DeliveryRequested", "package")] == 1  # the retry is not a taken edge
    assert edges[("delivery", "DeliveryCompleted")] == 2
    assert await edge_counts(recorded.db, T0 + 3600) == {}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"status": "bogus"}, "unknown status"),
        ({"sort": "data"}, "cannot sort by"),
        ({"field": "delivery_id"}, "delivery_id=d-000042"),
        ({"page": "x"}, "page must be a number"),
        ({"page": "0"}, "between 1 and"),
        ({"from": "yesterday"}, "is not a time"),
    ],
)
def test_bad_filters_are_refused_with_a_message(params: dict[str, str], message: str) -> None:
    with pytest.raises(BadFilter, match=message):
        TxFilter.from_params(params)


# sessions, CSRF, exposure ------------------------------------------------------------------------


def test_sessions_and_csrf_tokens_are_signed() -> None:
    signer, other = Signer(b"k" * 32), Signer(b"o" * 32)
    session = new_session(signed_in=True)
    cookie = signer.cookie(session)
    assert signer.session(cookie) == session
    assert other.session(cookie) is None  # signed with another secret
    payload, mac = cookie.rsplit(".", 1)
    assert signer.session(payload[:-2] + "xx." + mac) is None  # tampered
    assert signer.csrf_ok(session, signer.csrf(session))
    assert not signer.csrf_ok(session, other.csrf(session))
    assert not signer.csrf_ok(new_session(), signer.csrf(session))  # another session's token
    assert not signer.csrf_ok(None, signer.csrf(session))


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.org"])
def test_any_address_but_loopback_needs_a_token(host: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="refusing to serve the console"):
        ConsoleSettings(db_url="sqlite:///x.db", host=host).check_exposure()
    ConsoleSettings(db_url="sqlite:///x.db", host=host, token="t" * 16).check_exposure()
    for loopback in ("127.0.0.1", "localhost", "::1", "127.0.0.7"):
        ConsoleSettings(db_url="sqlite:///x.db", host=loopback).check_exposure()


@contextlib.asynccontextmanager
async def _client(settings: ConsoleSettings) -> AsyncIterator[httpx.AsyncClient]:
    """The console app, started (its lifespan run) and served in memory."""
    app = create_console_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as client,
    ):
        yield client


def _csrf(settings: ConsoleSettings, client: httpx.AsyncClient) -> str:
    signer = Signer(settings.secret)
    session = signer.session(client.cookies["cg_console"])
    assert session is not None
    return signer.csrf(session)


async def test_http_actions_need_the_csrf_token_and_read_only_refuses_them(
    recorded_sqlite: str,
) -> None:
    db_url = recorded_sqlite
    settings = ConsoleSettings(db_url=db_url, app_spec="choreograph.demo:create_app",
                               transport_url="memory://")  # fmt: skip
    async with _client(settings) as client:
        page = await client.get("/transactions/d-002-fail")
        assert page.status_code == 200 and "PackageRejected" in page.text
        api = (await client.get("/api/transactions", params={"status": "failed"})).json()
        assert [t["correlation_id"] for t in api["transactions"]] == ["d-002-fail"]
        assert (await client.get("/api/transactions", params={"status": "x"})).status_code == 400
        # a POST without the session's CSRF token is refused, whatever it asks
        refused = await client.post("/dead-letters/1/discard", data={"confirm": "yes"})
        assert refused.status_code == 403 and "CSRF" in refused.text
        forged = await client.post("/dead-letters/1/discard", data={"csrf": "made-up"})
        assert forged.status_code == 403
        # from another origin, even with the token
        token = _csrf(settings, client)
        cross = await client.post("/dead-letters/1/discard", data={"csrf": token},
                                  headers={"Origin": "http://evil.example"})  # fmt: skip
        assert cross.status_code == 403
        # with it, the action runs (and finds no such letter)
        found = await client.post("/dead-letters/1/discard", data={"csrf": token})
        assert found.status_code == 404
    read_only = ConsoleSettings(db_url=db_url, transport_url="memory://", read_only=True)
    async with _client(read_only) as client:
        await client.get("/")
        token = _csrf(read_only, client)
        replay = await client.post("/dead-letters/1/replay", data={"csrf": token})
        assert replay.status_code == 403
        assert (await client.get("/dead-letters/1/discard")).status_code == 403


def test_time_filter_reads_a_browser_datetime_as_utc() -> None:
    f = TxFilter.from_params({"from": "2027-01-15T08:00"})
    assert f.since == datetime(2027, 1, 15, 8, tzinfo=UTC).timestamp()
    assert TxFilter.from_params(f.params()).since == f.since
    assert time.time() > 0
