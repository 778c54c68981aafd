"""RateLimiter: per-client token buckets, sans-IO (the test passes the time, in seconds)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rapida_tap.ratelimit import Bucket, LogThrottle, RateLimiter, held_note


def allowed(limiter: RateLimiter, key: str, now: float, n: int) -> list[bool]:
    return [limiter.allow(key, now) for _ in range(n)]


def test_burst_then_refused() -> None:
    limiter = RateLimiter(rate=1.0, burst=3)
    assert allowed(limiter, "a", 0.0, 5) == [True, True, True, False, False]


def test_refill_over_time() -> None:
    limiter = RateLimiter(rate=2.0, burst=2)
    assert allowed(limiter, "a", 10.0, 3) == [True, True, False]
    assert limiter.allow("a", 10.25) is False  # half a token
    assert limiter.allow("a", 10.5) is True  # one token after 1/rate seconds
    assert limiter.allow("a", 10.5) is False
    assert allowed(limiter, "a", 11.5, 3) == [True, True, False]


def test_a_long_idle_refills_only_up_to_the_burst() -> None:
    limiter = RateLimiter(rate=5.0, burst=2)
    assert allowed(limiter, "a", 0.0, 2) == [True, True]
    assert allowed(limiter, "a", 3600.0, 3) == [True, True, False]


def test_refused_requests_do_not_earn_credit() -> None:
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.allow("a", 0.0)
    for t in (0.1, 0.2, 0.3, 0.9):
        assert not limiter.allow("a", t)
    assert limiter.allow("a", 1.0)


def test_keys_are_isolated() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    assert allowed(limiter, "10.0.0.1", 0.0, 3) == [True, True, False]
    assert allowed(limiter, "10.0.0.2", 0.0, 3) == [True, True, False]
    assert limiter.allow("10.0.0.1", 0.0) is False
    assert len(limiter) == 2


def test_clock_stepping_back_does_not_lock_a_client_out() -> None:
    """reactor.seconds() is wall-clock time; an NTP step back must not drain the bucket."""
    limiter = RateLimiter(rate=1.0, burst=2)
    assert allowed(limiter, "a", 1000.0, 3) == [True, True, False]
    assert limiter.allow("a", 0.0) is False  # stepped back an hour-ish: no credit, no debt
    assert limiter.allow("a", 1.0) is True  # refills from the new time


def test_memory_is_bounded_with_many_keys() -> None:
    limiter = RateLimiter(rate=1.0, burst=2, max_keys=100)
    for i in range(20_000):
        assert limiter.allow(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", i * 0.001)
        assert len(limiter) <= 100


def test_busy_clients_are_remembered_over_idle_ones() -> None:
    """Pruning forgets clients whose bucket has refilled before those still limited."""
    limiter = RateLimiter(rate=1.0, burst=2, max_keys=10)
    for i in range(9):
        limiter.allow(f"idle{i}", 0.0)
    assert allowed(limiter, "hot", 100.0, 3) == [True, True, False]
    limiter.allow("new", 100.0)  # the 11th key: prune
    assert len(limiter) == 2
    assert limiter.allow("hot", 100.0) is False  # still limited, not reset by the prune


def test_pruning_many_busy_clients_drops_the_oldest() -> None:
    limiter = RateLimiter(rate=0.001, burst=1, max_keys=10)
    for i in range(11):
        limiter.allow(f"k{i}", 0.0)
    assert len(limiter) == 9  # down to 90 %
    assert limiter.allow("k10", 0.0) is False  # the newest are kept
    assert limiter.allow("k0", 0.0) is True  # the oldest was forgotten


@given(
    rate=st.floats(0.1, 50.0),
    burst=st.integers(1, 20),
    steps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_refill(rate: float, burst: int, steps: list[float]) -> None:
    limiter = RateLimiter(rate=rate, burst=burst)
    now, count = 0.0, 0
    for step in steps:
        now += step
        count += limiter.allow("a", now)
        assert count <= burst + rate * now + 1e-9


def test_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = Bucket(rate=2.0, burst=3)
    assert [bucket.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.allow(0.49) is False
    assert bucket.allow(0.5) is True  # one token refilled after half a second


def test_bucket_survives_a_clock_step_back() -> None:
    bucket = Bucket(rate=1.0, burst=1)
    assert bucket.allow(10.0) is True
    assert bucket.allow(5.0) is False  # no refill from going back in time
    assert bucket.allow(6.5) is True


@given(
    rate=st.floats(0.1, 50.0),
    burst=st.integers(1, 20),
    steps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=200),
)
def test_bucket_never_more_than_burst_plus_refill(
    rate: float, burst: int, steps: list[float]
) -> None:
    bucket = Bucket(rate=rate, burst=burst)
    now, count = 0.0, 0
    for step in steps:
        now += step
        count += bucket.allow(now)
        assert count <= burst + rate * now + 1e-9


def test_log_throttle_one_line_per_key_and_interval_with_a_count() -> None:
    throttle = LogThrottle(interval=5.0)
    assert throttle.allow("a", 0.0) == 0
    assert [throttle.allow("a", t) for t in (1.0, 2.0, 4.9)] == [None, None, None]
    assert throttle.allow("b", 1.0) == 0  # keys are independent
    assert throttle.allow("a", 5.0) == 3  # the line that is written says how many were held
    assert throttle.allow("a", 10.0) == 0
    assert held_note(3) == " (and 3 more like it)"
    assert held_note(0) == ""
