"""Per-client token buckets (sans-IO: the caller passes the time)."""

from __future__ import annotations


class RateLimiter:
    """Allows ``rate`` events per second per key, in bursts of up to ``burst``.

    Memory is bounded: when more than ``max_keys`` keys are tracked, keys whose bucket has
    refilled completely (idle clients) are forgotten, then the least recently created ones.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 10000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def allow(self, key: str, now: float) -> bool:
        tokens, at = self._buckets.get(key, (self.burst, now))
        # reactor.seconds() is wall-clock time: a step back must not drain the bucket.
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._prune(now)
        return allowed

    def _prune(self, now: float) -> None:
        full = [
            k
            for k, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate >= self.burst
        ]
        for k in full:
            del self._buckets[k]
        excess = len(self._buckets) - self.max_keys * 9 // 10
        for k in list(self._buckets)[: max(excess, 0)]:  # many busy keys: forget the oldest
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)


class Bucket:
    """One token bucket: ``rate`` events per second in bursts of up to ``burst``."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = self.burst
        self._at: float | None = None

    def allow(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class LogThrottle:
    """At most one log line per cause every ``interval`` seconds (sans-IO: pass the time).

    ``allow(cause, now)`` says whether to log now and returns how many lines of that cause
    were held back since the last one (so the line can say "and N more"); ``None`` means
    stay quiet.  Causes are few and fixed (reasons, not peers), so memory is bounded by them.
    """

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, cause: str, now: float) -> int | None:
        last = self._last.get(cause)
        if last is not None and now - last < self.interval:
            if now < last:  # the wall clock stepped back: quiet for one interval from now
                self._last[cause] = now
            self._held[cause] = self._held.get(cause, 0) + 1
            return None
        self._last[cause] = now
        return self._held.pop(cause, 0)


def held_note(held: int) -> str:
    """`` (and N more like it)`` for a throttled log line, or nothing."""
    return f" (and {held} more like it)" if held else ""
