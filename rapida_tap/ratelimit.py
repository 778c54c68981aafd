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
    """At most one log line per key every ``interval`` seconds; the rest are counted.

    ``allow`` returns None while a key is quiet-listed, else how many lines were held back
    since the last one (so the line that does get written can say so).  Keys are few (causes,
    not peers), so memory is bounded by the caller's choice of keys.
    """

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str, now: float) -> int | None:
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


def held_note(held: int) -> str:
    """`` (and N more like it)`` for a throttled log line, or nothing."""
    return f" (and {held} more like it)" if held else ""
