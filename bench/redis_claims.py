"""Claims per second and claim latency of RedisContextStore against a local redis-server.

    .venv/bin/python bench/redis_claims.py [N] [CONCURRENCY]

Starts a private redis-server (tests/redis_server.py), mints N contexts, then claims them:
once one at a time (latency: p50/p99 of each claim's round trip, ms) and once with
CONCURRENCY claims in flight (throughput, claims/s).  Numbers, not assertions.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from twisted.internet import defer, reactor, task

from rapida_tap.contexts import CallContext, new_context_id
from rapida_tap.redis_store import RedisContextStore
from tests.redis_server import RedisServer


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


@defer.inlineCallbacks
def mint(store: RedisContextStore, n: int) -> Any:
    ids = [new_context_id() for _ in range(n)]
    for start in range(0, n, 500):
        batch = ids[start : start + 500]
        yield defer.gatherResults(
            [store.mint(CallContext(cid, "echo", caller="+4930123"), 300) for cid in batch]
        )
    return ids


@defer.inlineCallbacks
def main(_reactor: Any, n: int, concurrency: int) -> Any:
    server = RedisServer(reactor)
    yield server.start()
    store = RedisContextStore(reactor, server.url, command_timeout=5.0, health_interval=3600)
    store.start()
    try:
        ids = yield mint(store, n)
        latencies = []
        t0 = time.perf_counter()
        for cid in ids:
            t = time.perf_counter()
            yield store.claim(cid)
            latencies.append((time.perf_counter() - t) * 1000)
        sequential = n / (time.perf_counter() - t0)

        ids = yield mint(store, n)
        t0 = time.perf_counter()
        pending = iter(ids)

        @defer.inlineCallbacks
        def worker() -> Any:
            for cid in pending:
                yield store.claim(cid)

        yield defer.gatherResults([worker() for _ in range(concurrency)])
        parallel = n / (time.perf_counter() - t0)
        print(f"redis-server on 127.0.0.1, {n} claims each run, errors={store.stats['errors']}")
        print(
            f"one at a time:   {sequential:8.0f} claims/s  "
            f"p50 {percentile(latencies, 50):.3f} ms  p99 {percentile(latencies, 99):.3f} ms"
        )
        print(f"{concurrency} in flight:    {parallel:8.0f} claims/s")
    finally:
        yield store.stop()
        yield server.stop()


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    task.react(main, args or [20000, 64])
