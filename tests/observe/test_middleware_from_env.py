"""``middleware_from_env``: the observe middleware a process runs, chosen by its environment."""

from __future__ import annotations

import subprocess
import sys

import pytest

from choreograph import ConfigurationError
from choreograph.observe import (
    MetricsMiddleware,
    RecorderMiddleware,
    TracingMiddleware,
    middleware_from_env,
)


def test_an_empty_environment_turns_nothing_on() -> None:
    assert middleware_from_env({}) == []
    assert middleware_from_env({"OTEL_TRACES_EXPORTER": "none", "CHOREOGRAPH_RECORD": "0"}) == []
    assert middleware_from_env({"OTEL_TRACES_EXPORTER": " NONE ", "CHOREOGRAPH_RECORD": ""}) == []


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", " TRUE "])
def test_record_turns_on_the_recorder_middleware(value: str) -> None:
    [only] = middleware_from_env({"CHOREOGRAPH_RECORD": value})
    assert isinstance(only, RecorderMiddleware)


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "maybe"])
def test_record_stays_off_for_other_values(value: str) -> None:
    assert middleware_from_env({"CHOREOGRAPH_RECORD": value}) == []


def test_metrics_port_turns_on_metrics_served_on_that_port() -> None:
    [only] = middleware_from_env({"CHOREOGRAPH_METRICS_PORT": " 9464 "})
    assert isinstance(only, MetricsMiddleware)
    assert only.port == 9464


@pytest.mark.parametrize("value", ["abc", "70000", "-1", "9464x", "٣"])
def test_a_bad_metrics_port_is_a_clear_error(value: str) -> None:
    with pytest.raises(ConfigurationError, match="CHOREOGRAPH_METRICS_PORT"):
        middleware_from_env({"CHOREOGRAPH_METRICS_PORT": value})


def test_without_an_argument_the_process_environment_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("CHOREOGRAPH_METRICS_PORT", raising=False)
    monkeypatch.setenv("CHOREOGRAPH_RECORD", "1")

    assert [type(m) for m in middleware_from_env()] == [RecorderMiddleware]


def test_every_switch_at_once_gives_tracing_metrics_and_recording_in_that_order() -> None:
    # tracing installs a global tracer provider: look in a process of its own
    code = (
        "from choreograph.observe import middleware_from_env as m; "
        "print([type(x).__name__ for x in m({'OTEL_TRACES_EXPORTER': 'console', "
        "'CHOREOGRAPH_METRICS_PORT': '9464', 'CHOREOGRAPH_RECORD': '1'})])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    names = [TracingMiddleware.__name__, MetricsMiddleware.__name__, RecorderMiddleware.__name__]
    assert out.strip() == repr(names)


def test_an_unknown_trace_exporter_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="unknown trace exporter 'carrier-pigeon'"):
        middleware_from_env({"OTEL_TRACES_EXPORTER": "carrier-pigeon"})
