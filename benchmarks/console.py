"""The console's response times with 1,000,000 recorded events.

Run: ``.venv/bin/python -m benchmarks.console [events] [--keep DIR]``. Writes drone deliveries
straight into a fresh recorder database (about 6 events and 9 handlings each, spread over the last
7 days; 9% failed, 1% in flight), starts ``choreograph console`` on it as its own process and asks
each page and API call many times over HTTP, one at a time, printing p50/p95 per request.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import orjson

from choreograph.observe.flowdb import flowdb_from_url

DAYS = 7
HAPPY = ("DeliveryRequested", "PackageReady", "DroneScheduled", "DeliveryScheduled",
         "DroneArrived", "DeliveryCompleted")  # fmt: skip
FAILED = ("DeliveryRequested", "PackageRejected", "DroneScheduled", "DeliveryFailed")
SOURCE = {"DeliveryRequested": "ingestion", "PackageReady": "package",
          "PackageRejected": "package", "DroneScheduled": "drone-scheduler"}  # fmt: skip
HANDLERS = {
    "DeliveryRequested": [("package", "create_package"), ("drone-scheduler", "reserve_drone")],
    "PackageReady": [("delivery", "schedule_delivery")],
    "PackageRejected": [("delivery", "package_rejected")],
    "DroneScheduled": [("delivery", "schedule_delivery")],
    "DeliveryScheduled": [("ingestion", "track_scheduled")],
    "DroneArrived": [("delivery", "complete_delivery")],
    "DeliveryCompleted": [("ingestion", "track_completed"), ("notification", "notify_completed"),
                          ("package", "mark_delivered")],
    "DeliveryFailed": [("ingestion", "track_failed"), ("package", "release_package"),
                       ("drone-scheduler", "release_drone")],
}  # fmt: skip


def generate(path: Path, events: int, seed: int = 7) -> dict[str, str]:
    """Fill a recorder database with about ``events`` events; returns ids to search for."""
    asyncio.run(_create_schema(path))
    rng = random.Random(seed)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    now = time.time()
    written = 0
    number = 0
    sample: dict[str, str] = {}
    rollup: Counter[tuple[str, int, str, str]] = Counter()
    while written < events:
        rows_e, rows_h, rows_t, rows_k = [], [], [], []
        for _ in range(2000):
            number += 1
            cid = f"d-{number:07d}-{uuid.UUID(int=rng.getrandbits(128)).hex[:6]}"
            package_id, drone_id = f"p-{number:07d}", f"drone-{number % 500:04d}"
            roll = rng.random()
            kinds = FAILED if roll < 0.09 else HAPPY
            if roll > 0.99:
                kinds = HAPPY[:4]  # in flight
            start = now - rng.random() * DAYS * 86_400
            at, previous = start, None
            for index, kind in enumerate(kinds):
                at += rng.random() * 0.05
                event_id = str(uuid.UUID(int=rng.getrandbits(128)))
                data = {"delivery_id": cid, "package_id": package_id, "drone_id": drone_id}
                source = SOURCE.get(kind, "delivery")
                rows_e.append((event_id, kind, source, cid, previous, at, at, None, None,
                               orjson.dumps(data).decode()))  # fmt: skip
                minute = int(at // 60)
                rollup["edge", minute, source, kind] += 1
                for service, handler in HANDLERS[kind]:
                    outcome = "retry" if rng.random() < 0.02 else "done"
                    step = "compensation" if handler.startswith("release") else "handler"
                    rollup["handling", minute, service, f"{outcome}/{step}"] += 1
                    if outcome == "done":
                        rollup["edge", minute, kind, service] += 1
                    rows_h.append((f"{event_id}/{service}", event_id, kind, cid, service, handler,
                                   "compensation" if handler.startswith("release") else "handler",
                                   1, outcome, None, None, None, None, None, "[]", at + 0.001,
                                   at + 0.002))  # fmt: skip
                if index == 0:
                    rows_k += [(cid, "delivery_id", cid), (package_id, "package_id", cid),
                               (drone_id, "drone_id", cid)]  # fmt: skip
                previous = event_id
            terminal = kinds[-1] if (kinds[-1].startswith("Delivery") and len(kinds) > 4) or (
                kinds is FAILED) else None  # fmt: skip
            outcome = None if terminal is None else (
                "failed" if terminal == "DeliveryFailed" else "completed")  # fmt: skip
            rows_t.append((cid, start, at, kinds[0], kinds[-1], len(kinds),
                           int(kinds is FAILED), 0, 0, 2 if kinds is FAILED else 0, terminal,
                           at if terminal else None, 0, outcome))  # fmt: skip
            written += len(kinds)
            sample.setdefault(outcome or "in_flight", cid)
            sample["package_id"] = package_id
        with conn:
            conn.executemany(f"INSERT INTO cg_events VALUES ({_marks(10)})", rows_e)
            conn.executemany(
                "INSERT INTO cg_handlings (id, event_id, event_type, correlation_id, service, "
                "handler, kind, attempt, outcome, delay, reason, error_type, error, note, "
                f"emitted, started, ended) VALUES ({_marks(17)})",
                rows_h,
            )
            conn.executemany(
                "INSERT INTO cg_transactions (correlation_id, first_seen, last_seen, first_type, "
                "last_type, events, failures, retries, dead_letters, compensations, "
                f"terminal_type, ended_at, late, outcome) VALUES ({_marks(14)})",
                rows_t,
            )
            conn.executemany(
                "INSERT OR IGNORE INTO cg_keys (value, name, correlation_id) VALUES (?, ?, ?)",
                rows_k,
            )
    with conn:
        conn.executemany(
            "INSERT INTO cg_rollup (kind, minute, a, b, n) VALUES (?, ?, ?, ?, ?)",
            [(*key, n) for key, n in rollup.items()],
        )
    conn.execute("ANALYZE")
    conn.close()
    return sample


def _marks(count: int) -> str:
    return ", ".join("?" for _ in range(count))


async def _create_schema(path: Path) -> None:
    db = flowdb_from_url(f"sqlite:///{path}")
    await db.open()
    await db.close()


def measure(base: str, paths: list[tuple[str, str]], rounds: int) -> list[tuple[str, float, float]]:
    results = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for label, path in paths:
            client.get(path).raise_for_status()  # warm the page cache and the query plans
            took = []
            for _ in range(rounds):
                started = time.perf_counter()
                response = client.get(path)
                took.append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
            took.sort()
            p95 = took[min(len(took) - 1, int(len(took) * 0.95))]
            results.append((label, statistics.median(took), p95))
            print(f"{label:<52} p50 {results[-1][1]:8.1f} ms   p95 {p95:8.1f} ms", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("events", nargs="?", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--keep", type=Path, default=None, help="keep the database here")
    args = parser.parse_args()
    where = args.keep or Path(tempfile.mkdtemp(prefix="choreograph-console-bench-"))
    where.mkdir(parents=True, exist_ok=True)
    db = where / "flows.db"
    started = time.perf_counter()
    sample = _sample(db) if db.exists() else generate(db, args.events)
    counts = _counts(db)
    print(f"{counts} in {db} ({time.perf_counter() - started:.0f} s)", flush=True)
    port = _free_port()
    console = subprocess.Popen(
        [sys.executable, "-m", "choreograph", "console", "--db", f"sqlite:///{db}", "--app",
         "choreograph.demo:create_app", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(base)
        failed, done, package = sample["failed"], sample["completed"], sample["package_id"]
        paths = [
            ("transaction list (newest first, page 1)", "/transactions"),
            ("transaction list, page 20", "/transactions?page=20"),
            ("transaction list sorted by events", "/transactions?sort=events"),
            ("search: correlation id", f"/transactions?q={done}"),
            ("search: correlation id prefix", f"/transactions?q={done[:9]}"),
            ("search: business key value (package id)", f"/transactions?q={package}"),
            ("search: data field package_id=…", f"/transactions?field=package_id%3D{package}"),
            ("search: event type (rare: PackageRejected)", "/transactions?type=PackageRejected"),
            ("search: event type (in every one: DeliveryRequested)",
             "/transactions?type=DeliveryRequested"),
            ("search: status failed", "/transactions?status=failed"),
            ("search: status stuck", "/transactions?status=stuck"),
            ("search: failed in a 1-hour range", "/transactions?status=failed&" + _range()),
            ("API: /api/transactions?q=…", f"/api/transactions?q={failed}"),
            ("one transaction page", f"/transactions/{failed}"),
            ("overview, last 24 h", "/?window=24h"),
            ("overview, all 7 days", "/?window=all"),
            ("choreography with edge counts, 24 h", "/choreography?window=24h"),
        ]  # fmt: skip
        measure(base, paths, args.rounds)
    finally:
        console.terminate()
        console.wait(10)
        if args.keep is None:
            shutil.rmtree(where, ignore_errors=True)


def _range() -> str:
    end = time.time() - 86_400
    return f"from={end - 3600:.0f}&to={end:.0f}"


def _sample(db: Path) -> dict[str, str]:
    conn = sqlite3.connect(db)
    found = {}
    for outcome in ("failed", "completed"):
        found[outcome] = conn.execute(
            "SELECT correlation_id FROM cg_transactions WHERE outcome = ? LIMIT 1", (outcome,)
        ).fetchone()[0]
    found["package_id"] = conn.execute(
        "SELECT value FROM cg_keys WHERE name = 'package_id' LIMIT 1"
    ).fetchone()[0]
    conn.close()
    return found


def _counts(db: Path) -> str:
    conn = sqlite3.connect(db)
    parts = [
        f"{conn.execute(f'SELECT COUNT(*) FROM {t}').fetchone()[0]:,} {t}"
        for t in ("cg_events", "cg_handlings", "cg_transactions", "cg_keys")
    ]
    conn.close()
    return ", ".join(parts)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(base: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(base + "/static/console.css", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the console did not start")


if __name__ == "__main__":
    main()
