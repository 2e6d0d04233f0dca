"""RetryPolicy: when a failed handling is tried again, and when it gives up."""

from __future__ import annotations

import random
import re

import pytest

from choreograph import ConfigurationError, RetryPolicy
from choreograph.retry import DEFAULT_RETRY, NO_RETRY

NO_JITTER = {"jitter": 0.0}


def test_the_first_retries_are_immediate() -> None:
    # given a policy with two immediate retries
    policy = RetryPolicy(max_attempts=10, immediate=2, base_delay=1.0, **NO_JITTER)

    # then attempts 1 and 2 are retried at once, attempt 3 after the base delay
    assert policy.delay(1) == 0.0
    assert policy.delay(2) == 0.0
    assert policy.delay(3) == 1.0


def test_backoff_grows_by_its_factor_after_the_immediate_retries() -> None:
    # given a policy without jitter: one immediate retry, then 0.5 s growing threefold
    policy = RetryPolicy(max_attempts=10, immediate=1, base_delay=0.5, factor=3.0, **NO_JITTER)

    # then each delay is the previous one times the factor
    assert [policy.delay(n) for n in range(1, 6)] == [0.0, 0.5, 1.5, 4.5, 13.5]


def test_backoff_stops_growing_at_max_delay() -> None:
    policy = RetryPolicy(
        max_attempts=100, immediate=0, base_delay=1.0, factor=2.0, max_delay=5.0, **NO_JITTER
    )

    assert [policy.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.delay(60) == 5.0


def test_no_immediate_retry_means_backoff_from_the_first_failure() -> None:
    policy = RetryPolicy(immediate=0, base_delay=2.0, factor=2.0, **NO_JITTER)

    assert policy.delay(1) == 2.0
    assert policy.delay(2) == 4.0


def test_jitter_spreads_each_delay_within_its_fraction_either_way() -> None:
    # given a policy with 25 % jitter and a seeded random source
    policy = RetryPolicy(
        max_attempts=10, immediate=0, base_delay=4.0, factor=2.0, max_delay=60.0, jitter=0.25
    )
    rng = random.Random(7)

    # when the delay of attempt 2 (8 s before jitter) is drawn many times
    delays = [policy.delay(2, rng) for _ in range(2_000)]

    # then every delay lies within 8 s +- 25 %, and they use most of that range on both sides
    assert all(6.0 <= d <= 10.0 for d in delays)
    assert min(delays) < 6.2
    assert max(delays) > 9.8
    assert len(set(delays)) > 1_900
    below = sum(1 for d in delays if d < 8.0)
    assert 800 < below < 1_200


def test_jitter_applies_on_top_of_the_cap() -> None:
    policy = RetryPolicy(immediate=0, base_delay=1.0, factor=10.0, max_delay=3.0, jitter=0.5)
    delays = [policy.delay(9, random.Random(seed)) for seed in range(300)]

    assert all(1.5 <= d <= 4.5 for d in delays)
    assert max(delays) > 4.0
    assert min(delays) < 2.0


def test_the_same_seed_draws_the_same_delays() -> None:
    policy = RetryPolicy(immediate=0, base_delay=1.0, jitter=0.5)

    first = [policy.delay(n, random.Random(42)) for n in range(1, 6)]
    again = [policy.delay(n, random.Random(42)) for n in range(1, 6)]

    assert first == again


def test_without_a_random_source_the_module_one_is_used() -> None:
    # given the module's random source seeded
    policy = RetryPolicy(immediate=0, base_delay=1.0, jitter=0.5)
    saved = random.getstate()
    random.seed(3)
    try:
        drawn = policy.delay(1)
    finally:
        random.setstate(saved)

    # then a delay drawn without an rng is the one that seed gives
    assert drawn == 1.0 * (1 + random.Random(3).uniform(-0.5, 0.5))


def test_full_jitter_never_gives_a_negative_delay() -> None:
    policy = RetryPolicy(immediate=0, base_delay=1.0, jitter=1.0)
    rng = random.Random(1)

    delays = [policy.delay(1, rng) for _ in range(2_000)]

    assert min(delays) >= 0.0
    assert max(delays) > 1.9


def test_gives_up_when_the_attempts_are_used_up() -> None:
    policy = RetryPolicy(max_attempts=3)

    assert [policy.gives_up(n) for n in (1, 2, 3, 4)] == [False, False, True, True]
    assert NO_RETRY.gives_up(1)
    assert not DEFAULT_RETRY.gives_up(DEFAULT_RETRY.max_attempts - 1)
    assert DEFAULT_RETRY.gives_up(DEFAULT_RETRY.max_attempts)


def test_the_defaults_are_the_documented_ones() -> None:
    policy = RetryPolicy()

    assert (policy.max_attempts, policy.immediate) == (5, 1)
    assert (policy.base_delay, policy.factor, policy.max_delay, policy.jitter) == (
        0.5,
        2.0,
        60.0,
        0.2,
    )
    assert policy == DEFAULT_RETRY
    assert NO_RETRY.max_attempts == 1


NEGATIVE = "RetryPolicy delays and counts must not be negative"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_attempts": 0}, "RetryPolicy.max_attempts must be at least 1"),
        ({"immediate": -1}, NEGATIVE),
        ({"base_delay": -0.1}, NEGATIVE),
        ({"max_delay": -1.0}, NEGATIVE),
        ({"jitter": -0.01}, "RetryPolicy.jitter must be between 0 and 1"),
        ({"jitter": 1.01}, "RetryPolicy.jitter must be between 0 and 1"),
    ],
    ids=lambda s: next(iter(s)) + "=" + str(next(iter(s.values()))) if isinstance(s, dict) else "",
)
def test_impossible_settings_are_refused(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{re.escape(message)}$"):
        RetryPolicy(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "settings",
    [
        {"max_attempts": 1},
        {"immediate": 0},
        {"base_delay": 0.0},
        {"max_delay": 0.0},
        {"jitter": 0.0},
        {"jitter": 1.0},
    ],
    ids=lambda s: next(iter(s)) + "=" + str(next(iter(s.values()))),
)
def test_boundary_settings_are_accepted(settings: dict[str, float]) -> None:
    policy = RetryPolicy(**settings)  # type: ignore[arg-type]
    for name, value in settings.items():
        assert getattr(policy, name) == value
