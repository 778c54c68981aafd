"""Registrations per second and claim latency of a node whose contexts are in Redis.

    PYTHONPATH=. .venv/bin/python bench/redis_registrations.py [N] [CONCURRENCY]

Starts a private redis-server (tests/redis_server.py) and two daemons sharing it, as in
docs/operations.md.  Measures, on 127.0.0.1:

- registrations/s: N registrations on node A over HTTP exactly as func_curl sends them (one
  connection each, closed by the server), CONCURRENCY in flight; p50/p99 of each round trip;
- claim latency: for N/10 of those contexts, an AudioSocket connection to node B; the time from
  the UUID frame being written to node B's call having started (context claimed from Redis,
  call created): p50/p99, one at a time.

Numbers, not assertions.  Memory contexts are measured too, for comparison.
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

from twisted.internet import defer, reactor, task

from rapida_tap.audiosocket.wire import Kind, encode_frame
from rapida_tap.media.call import Call
from tests.redis_server import RedisServer
from tests.support import FakeAsterisk, connect_audiosocket, register, start_daemon


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class _Cleanups:
    """What ``start_daemon`` needs of a test case: somewhere to put its clean-ups."""

    def __init__(self) -> None:
        self._cleanups: list[Any] = []

    def addCleanup(self, f: Any, *args: Any) -> None:
        self._cleanups.append((f, args))

    @defer.inlineCallbacks
    def run_cleanups(self) -> Any:
        for f, args in reversed(self._cleanups):
            yield f(*args)


@defer.inlineCallbacks
def registrations(port: int, n: int, concurrency: int) -> Any:
    ids: list[str] = []
    latencies: list[float] = []
    todo = iter(range(n))

    @defer.inlineCallbacks
    def worker() -> Any:
        for _ in todo:
            t = time.perf_counter()
            ids.append((yield register(port)))
            latencies.append((time.perf_counter() - t) * 1000)

    t0 = time.perf_counter()
    yield defer.gatherResults([worker() for _ in range(concurrency)])
    rate = n / (time.perf_counter() - t0)
    return ids, rate, latencies


@defer.inlineCallbacks
def claims(node: Any, ids: list[str]) -> Any:
    latencies: list[float] = []
    started: dict[str, float] = {}

    def on_start(call: Call) -> None:
        started[call.context_id] = time.perf_counter()

    node.bridge.call_started.append(on_start)
    for ctx in ids:
        client = FakeAsterisk(None)
        yield connect_audiosocket(node.as_port, client)
        t = time.perf_counter()
        client.send(encode_frame(Kind.UUID, uuid.UUID(ctx).bytes))
        while ctx not in started:
            yield task.deferLater(reactor, 0, lambda: None)
        latencies.append((started[ctx] - t) * 1000)
        client.transport.loseConnection()
        yield client.closed
    node.bridge.call_started.remove(on_start)
    return latencies


@defer.inlineCallbacks
def run(label: str, contexts: str, n: int, concurrency: int) -> Any:
    case = _Cleanups()
    settings = dict(contexts=contexts, rate_limit=1e9, rate_burst=10**9, context_ttl=300.0)
    a = start_daemon(case, **settings)
    b = start_daemon(case, **settings) if contexts != "memory" else a
    try:
        if contexts != "memory":
            while not (a.contexts.healthy and b.contexts.healthy):
                yield task.deferLater(reactor, 0.01, lambda: None)
        yield registrations(a.http_port, min(n, 200), concurrency)  # warm-up
        ids, rate, reg = yield registrations(a.http_port, n, concurrency)
        claim = yield claims(b, ids[: max(1, n // 10)])
        print(
            f"{label:14} {rate:7.0f} registrations/s ({concurrency} in flight; "
            f"p50 {percentile(reg, 50):.2f} ms, p99 {percentile(reg, 99):.2f} ms)   "
            f"claim on {'B' if b is not a else 'A'}: p50 {percentile(claim, 50):.2f} ms, "
            f"p99 {percentile(claim, 99):.2f} ms ({len(claim)} calls)"
        )
    finally:
        yield case.run_cleanups()


@defer.inlineCallbacks
def main(_reactor: Any, n: int, concurrency: int) -> Any:
    server = RedisServer(reactor)
    yield server.start()
    try:
        yield run("memory", "memory", n, concurrency)
        yield run("redis, 2 nodes", server.url, n, concurrency)
    finally:
        yield server.stop()


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    task.react(main, args or [5000, 32])
