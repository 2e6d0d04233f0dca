"""``redact`` hides every credential of the URLs in a text, and only those."""

from __future__ import annotations

import logging
import sys

import pytest

from choreograph.logs import JsonFormatter, TextFormatter
from choreograph.stores.postgres import PostgresSettings
from choreograph.transport import redact
from choreograph.transports.nats import NatsSettings

CASES = [
    # (what, text, redacted)
    ("password", "amqp://guest:s3cret@127.0.0.1:5672/%2f", "amqp://guest:***@127.0.0.1:5672/%2f"),
    ("empty user", "redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("NATS token", "nats://s3cret@127.0.0.1:4222", "nats://***@127.0.0.1:4222"),
    ("user alone", "postgresql://s3cret@db/app", "postgresql://***@db/app"),
    ("encoded password", "amqp://u:p%40ss%3As3cret@h", "amqp://u:***@h"),
    ("'@' in the password", "amqp://u:p@s3cret@h/vh", "amqp://u:***@h/vh"),
    ("'#' in the password", "amqp://u:p#s3cret@h", "amqp://u:***@h"),
    ("password option", "postgresql://h/db?password=s3cret&sslmode=require",
     "postgresql://h/db?password=***&sslmode=require"),
    ("token option", "nats://h:4222?TOKEN=s3cret", "nats://h:4222?TOKEN=***"),
    ("servers list", "nats://h1:4222?servers=nats://u:s3cret@h2:4222,nats://s3cret@h3:4222",
     "nats://h1:4222?servers=nats://u:***@h2:4222,nats://***@h3:4222"),
    ("encoded servers", "nats://h1?servers=nats%3A%2F%2Fu%3As3cret%40h2&name=x",
     "nats://h1?servers=nats://u:***@h2&name=x"),
    ("in a sentence", "cannot reach 'amqp://u:s3cret@h:5672' (refused), nor nats://s3cret@h2.",
     "cannot reach 'amqp://u:***@h:5672' (refused), nor nats://***@h2."),
    ("a server list in a sentence", "servers nats://a:s3cret@h1,nats://s3cret@h2 down",
     "servers nats://a:***@h1,nats://***@h2 down"),
    ("nothing secret", "sqlite:///var/lib/bus.db?busy_timeout=5", "sqlite:///var/lib/bus.db?busy_timeout=5"),
    ("memory", "memory://", "memory://"),
    ("host and port only", "nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ("not a URL", "a plain message: key=value@host", "a plain message: key=value@host"),
    ("a malformed URL", "amqp://u:s3cret@[::1", "amqp://u:***@[::1"),
    ("fragment kept", "amqp://h/vh#part", "amqp://h/vh#part"),
]  # fmt: skip


@pytest.mark.parametrize("what, text, redacted", CASES, ids=[c[0] for c in CASES])
def test_redact(what: str, text: str, redacted: str) -> None:
    assert redact(text) == redacted
    assert "s3cret" not in redact(text)
    assert redact(redact(text)) == redacted  # redacting twice changes nothing more


def test_settings_never_show_credentials_in_their_repr() -> None:
    nats = NatsSettings.from_url("nats://s3cret@127.0.0.1:4222?servers=nats://u:s3cret@h2:4222")
    postgres = PostgresSettings.from_url("postgresql://u:s3cret@127.0.0.1/test", "svc")
    assert "s3cret" not in repr(nats) and "s3cret" not in repr(postgres)
    assert "s3cret" in postgres.dsn  # the driver still gets it


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_log_lines_are_redacted_tracebacks_included(formatter: logging.Formatter) -> None:
    # given the formatters the CLI logs with
    try:
        raise ConnectionError("refused by amqp://guest:s3cret@127.0.0.1:5672/")
    except ConnectionError:
        record = logging.LogRecord(
            "aiormq.connection", logging.WARNING, __file__, 1, "connecting to %s",
            ("nats://s3cret@127.0.0.1:4222",), sys.exc_info(),
        )  # fmt: skip
    # when a library logs a URL, with an exception naming another
    line = formatter.format(record)
    # then neither secret is in the line, and the rest is
    assert "s3cret" not in line
    assert "connecting to nats://***@127.0.0.1:4222" in line
    assert "ConnectionError: refused by amqp://guest:***@127.0.0.1:5672/" in line
