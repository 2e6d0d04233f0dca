"""Prometheus metrics: the endpoint serves valid text with the counters of what happened."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from choreograph import Runtime
from choreograph.observe.metrics import MetricsMiddleware
from tests.observe.conftest import place, wait_for
from tests.observe.shop import build_app
from tests.support.quiet import wait_until_quiet


def sample(
    families: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str
) -> float:
    total = 0.0
    for key, value in families.get(name, {}).items():
        if set(labels.items()) <= set(key):
            total += value
    return total


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode())


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):  # raises on invalid exposition text
        for s in family.samples:
            found.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return found


async def test_metrics_endpoint_counts_handlings_retries_and_compensations() -> None:
    metrics = MetricsMiddleware(port=0, addr="127.0.0.1", lag_interval=0.05)
    async with Runtime(
        build_app(), transport="memory://", store="memory://", middleware=[metrics]
    ) as runtime:
        assert metrics.url is not None
        await place(runtime, "o-1", sku="flaky")
        await place(runtime, "o-2", sku="declined")

        def settled() -> bool:
            now = parse(metrics.text())
            return (
                sample(now, "choreograph_compensations_total") == 2
                and sample(now, "choreograph_emitted_total", event_type="OrderShipped") == 1
            )

        await wait_for(settled)
        await wait_until_quiet(runtime)  # payment also handles the OrderShipped that ends o-1
        await metrics.refresh_lag()
        families = scrape(metrics.url)
    assert metrics.url is None  # stopped with the runtime

    handled = "choreograph_handled_total"
    assert sample(families, handled, service="stock", event_type="OrderPlaced", outcome="done") == 2
    assert (
        sample(families, handled, service="stock", event_type="OrderPlaced", outcome="retry") == 1
    )
    assert sample(families, "choreograph_retried_total", service="stock") == 1
    assert sample(families, "choreograph_failed_total", service="stock") == 1
    assert sample(families, "choreograph_dead_lettered_total") == 0
    assert sample(families, "choreograph_compensations_total", event_type="OrderFailed") == 2
    assert (
        sample(families, "choreograph_emitted_total", service="shipping", event_type="OrderShipped")
        == 1
    )
    # two orders, one compensation, and the OrderShipped that tells payment o-1 ended
    assert sample(families, "choreograph_handling_seconds_count", service="payment") == 4
    assert ("service", "stock") in {k for key in families["choreograph_inflight"] for k in key}
    assert sample(families, "choreograph_consumer_lag", service="stock") == 0
