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
