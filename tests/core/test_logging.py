"""Failures are visible in the log: WARNING per failed attempt, ERROR on giving up, each with the
handling's ids and the traceback (kept by the dead letter too); JSON lines parse."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from choreograph import App, Context, Event, RetryLater, Service
from choreograph.logs import HandlingFilter, JsonFormatter, TextFormatter, configure_logging
from choreograph.retry import RetryPolicy
from choreograph.testing import Harness
from tests.support.procs import choreograph_command, wait_until


class Divide(Event):
    by: int


calc = Service("calc", retry=RetryPolicy(max_attempts=2, immediate=1, base_delay=0.01))


@calc.on(Divide)
async def divide(event: Divide, ctx: Context) -> None:
    logging.getLogger("users.own.code").info("dividing 1 by %s", event.by)
    _ = 1 / event.by


app = App("calc", [calc])


@pytest.fixture
def captured() -> Iterator[list[logging.LogRecord]]:
    """Every record of any logger, passed through the handling filter as configured ones are."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    handler.addFilter(HandlingFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def test_a_failing_handler_is_logged_per_attempt_with_ids_and_traceback(
    captured: list[logging.LogRecord],
) -> None:
    # given a handler that divides by zero, retried once
    async with Harness(app) as h:
        # when its event arrives and both attempts fail
        sent = await h.publish(Divide(by=0), correlation_id="tx-1")
        await h.advance(1)
        await h.settle()
        [dead] = await h.dead_letters("calc")

    # then the first failure is a WARNING and the give-up an ERROR, each naming the service,
    # handler, event type and id, correlation id and attempt, with the handler's traceback
    failures = [r for r in captured if r.name == "choreograph.handling"]
    assert [(r.levelno, r.attempt) for r in failures] == [  # type: ignore[attr-defined]
        (logging.WARNING, 1),
        (logging.ERROR, 2),
    ]
    for record in failures:
        fields = vars(record)
        assert fields["service"] == "calc" and fields["handler"] == "divide"
        assert fields["event_type"] == "Divide" and fields["event_id"] == sent.id
        assert fields["correlation_id"] == "tx-1"
        assert "ZeroDivisionError" in record.getMessage()
        assert record.exc_text is not None
        assert "in divide" in record.exc_text and "_ = 1 / event.by" in record.exc_text
    assert "retrying" in failures[0].getMessage()
    assert "gave up" in failures[1].getMessage() and "dead-lettered" in failures[1].getMessage()

    # and the dead letter keeps the traceback
    assert "in divide" in dead.failure.traceback
    assert dead.failure.traceback.rstrip().endswith("ZeroDivisionError: division by zero")


async def test_records_logged_during_a_handling_carry_its_ids(
    captured: list[logging.LogRecord],
) -> None:
    # given a handler that logs with its own logger
    async with Harness(app) as h:
        sent = await h.publish(Divide(by=2), correlation_id="tx-2")
        await h.settle()
    # then its record carries the handling's correlation and event ids
    [own] = [r for r in captured if r.name == "users.own.code"]
    assert (vars(own)["correlation_id"], vars(own)["event_id"]) == ("tx-2", sent.id)
    # and a record made outside any handling carries none
    logging.getLogger("users.own.code").info("outside")
    assert vars(captured[-1])["correlation_id"] is None


def test_the_text_format_shows_the_ids_and_the_json_format_is_one_object_a_line() -> None:
    record = logging.makeLogRecord(
        {"name": "x", "levelno": 30, "levelname": "WARNING", "msg": "hello %s", "args": ("you",)}
    )
    record.exc_text = "Traceback (most recent call last):\nValueError: no"
    HandlingFilter().filter(record)
    record.correlation_id, record.event_id = "c-1", "e-1"
    text = TextFormatter().format(record)
    assert "hello you [correlation_id=c-1 event_id=e-1]" in text and "ValueError: no" in text
    line = JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == "hello you" and doc["correlation_id"] == "c-1"
    assert doc["traceback"].endswith("ValueError: no")


def test_configure_logging_quiets_the_drivers_unless_debugging() -> None:
    stream = io.StringIO()
    try:
        configure_logging(logging.INFO, "json", stream)
        assert logging.getLogger("aiormq").getEffectiveLevel() == logging.CRITICAL
        logging.getLogger("aiormq").error("error when creating transport")
        logging.getLogger("choreograph.x").info("kept")
        assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["kept"]
        configure_logging(logging.DEBUG, "text", stream)
        assert logging.getLogger("aiormq").getEffectiveLevel() == logging.DEBUG
    finally:
        configure_logging(logging.WARNING)


@pytest.mark.slow
def test_choreograph_run_logs_a_failing_handler_as_json_lines(tmp_path: Path) -> None:
    # given the failing app, an event waiting for it, and CHOREOGRAPH_LOG_FORMAT=json
    module = Path(__file__).resolve()
    (tmp_path / "calc_app.py").write_text(module.read_text())
    env = {**os.environ, "CHOREOGRAPH_LOG_FORMAT": "json", "PYTHONPATH": str(module.parents[2])}
    cli = choreograph_command()
    subprocess.run(
        [*cli, "publish", "Divide", '{"by": 0}', "--app", "calc_app:app",
         "--correlation-id", "tx-3"], cwd=tmp_path, env=env, check=True, capture_output=True,
    )  # fmt: skip
    log = tmp_path / "err.log"
    # when `choreograph run` handles it
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [*cli, "run", "--app", "calc_app:app"], cwd=tmp_path, env=env,
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        wait_until(lambda: "gave up" in log.read_text(), 60, "the give-up to be logged")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    # then every line on stderr is a JSON object, and the failures carry ids and traceback
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    failures = [d for d in lines if d["logger"] == "choreograph.handling"]
    assert [d["level"] for d in failures] == ["WARNING", "ERROR"]
    assert all(d["correlation_id"] == "tx-3" for d in failures)
    assert all("ZeroDivisionError" in d["traceback"] for d in failures)


def test_both_formats_redact_the_secrets_of_urls_in_a_record() -> None:
    record = logging.makeLogRecord(
        {"name": "aiormq", "levelno": 40, "levelname": "ERROR",
         "msg": "cannot connect to %s", "args": ("amqp://user:hunter2@127.0.0.1:5672/",)}
    )  # fmt: skip
    record.exc_text = "ConnectionError: amqp://user:hunter2@127.0.0.1:5672/ refused"
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert "hunter2" not in line and "user:***@127.0.0.1" in line


patient = Service("patient", retry=RetryPolicy(max_attempts=2, immediate=1, base_delay=0.01))


@patient.on(Divide)
async def later(event: Divide, ctx: Context) -> None:
    if ctx.attempt == 1:
        raise RetryLater("the bank is closed", delay=0.01)


async def test_a_retry_the_handler_asks_for_is_info_without_a_traceback(
    captured: list[logging.LogRecord],
) -> None:
    async with Harness(App("patient", [patient])) as h:
        await h.publish(Divide(by=1), correlation_id="tx-4")
        await h.advance(1)
        await h.settle()
    [asked] = [r for r in captured if r.name == "choreograph.handling"]
    assert asked.levelno == logging.INFO and asked.exc_text is None
    assert "the bank is closed" in asked.getMessage()
