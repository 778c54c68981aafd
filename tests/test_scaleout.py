"""Two daemons sharing contexts through one real redis-server (tests/redis_server.py)."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from rapida_tap.audiosocket.wire import Kind, encode_frame
from rapida_tap.reasons import EndReason as reasons
from tests.redis_server import RedisServer
from tests.support import (
    API_KEY,
    FakeAsterisk,
    connect_audiosocket,
    curl_get,
    raw_http,
    register,
    start_daemon,
    tone,
    wait_until,
)

SILENCE = bytes(320)


def send(client: FakeAsterisk, frames: list[bytes]) -> None:
    """Write 8 kHz audio frames at once; the echo comes back paced."""
    client.send(b"".join(encode_frame(Kind.SLIN_8K, f) for f in frames))


def get(port: int, path: str, timeout: float = 5.0) -> Any:
    return raw_http(
        port, curl_get(path, headers={"X-Api-Key": API_KEY, "Connection": "close"}), timeout
    )


class TwoNodesTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.redis = RedisServer(reactor)
        yield self.redis.start()
        self.addCleanup(self.redis.stop)  # runs last: after both daemons are stopped
        self.a = start_daemon(self, contexts=self.redis.url, context_ttl=5.0)
        self.b = start_daemon(self, contexts=self.redis.url)
        yield wait_until(lambda: self.a.contexts.healthy and self.b.contexts.healthy)

    @defer.inlineCallbacks
    def test_register_on_a_audiosocket_to_b_hears_the_echo(self) -> Any:
        ctx = yield register(self.a.http_port)
        client = FakeAsterisk(ctx)
        yield connect_audiosocket(self.b.as_port, client)
        # audio before the claim completes (a Redis round trip) has no assistant to go to
        yield wait_until(lambda: ctx in self.b.bridge.calls)
        sent = tone(25)
        send(client, sent)
        yield wait_until(lambda: sum(r.payload != SILENCE for r in client.received) >= 25)
        echoed = [r.payload for r in client.received if r.payload != SILENCE]
        self.assertEqual(echoed, sent)
        self.assertIn(ctx, self.b.bridge.calls)
        self.assertEqual(self.a.bridge.calls, {})
        again = FakeAsterisk(ctx)  # single use, whichever node is asked
        yield connect_audiosocket(self.a.as_port, again)
        yield again.closed
        self.assertEqual(self.a.audiosocket.listener.refused, {"context-reused": 1})
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_two_nodes_racing_for_one_context_start_one_call(self) -> Any:
        for _ in range(5):
            ctx = yield register(self.a.http_port)
            clients = [FakeAsterisk(ctx), FakeAsterisk(ctx), FakeAsterisk(ctx), FakeAsterisk(ctx)]
            nodes = [self.a, self.b, self.a, self.b]
            yield defer.gatherResults(
                [connect_audiosocket(n.as_port, c) for n, c in zip(nodes, clients, strict=True)]
            )
            yield wait_until(lambda clients=clients: sum(c.closed.called for c in clients) == 3)
            winners = [ctx in self.a.bridge.calls, ctx in self.b.bridge.calls]
            self.assertEqual(winners.count(True), 1)
            (open_client,) = [c for c in clients if not c.closed.called]
            open_client.transport.loseConnection()
            yield open_client.closed
        refused = {**self.a.audiosocket.listener.refused}
        for reason, count in self.b.audiosocket.listener.refused.items():
            refused[reason] = refused.get(reason, 0) + count
        self.assertEqual(refused, {"context-reused": 15})

    @defer.inlineCallbacks
    def test_an_unclaimed_context_expires_in_redis(self) -> Any:
        self.a.registration._ttl = 0.2
        ctx = yield register(self.a.http_port)
        key = f"rapida:ctx:{{{ctx}}}"
        self.assertEqual((yield self.redis.command("EXISTS", key)), b":1")
        ttl = yield self.redis.command("PTTL", key)
        self.assertTrue(0 < int(ttl[1:]) <= 200, ttl)

        @defer.inlineCallbacks
        def gone() -> Any:
            while (yield self.redis.command("EXISTS", key)) != b":0":
                yield deferLater(reactor, 0.05, lambda: None)

        yield gone()
        client = FakeAsterisk(ctx)
        yield connect_audiosocket(self.b.as_port, client)
        yield client.closed
        self.assertEqual(self.b.audiosocket.listener.refused, {"context-expired": 1})

    @defer.inlineCallbacks
    def test_redis_killed_then_restarted(self) -> Any:
        ctx = yield register(self.a.http_port)
        live = FakeAsterisk(ctx)
        yield connect_audiosocket(self.b.as_port, live)
        yield wait_until(lambda: ctx in self.b.bridge.calls)

        yield self.redis.kill()
        yield wait_until(lambda: not self.a.contexts.healthy)

        # registration: 503 with an empty body, within the command timeout (not a hang)
        reply = yield get(self.a.http_port, "/v1/talk/asterisk/call/123456789", timeout=3.0)
        self.assertEqual((reply.status, reply.body), (503, b""))
        self.assertEqual(reply.headers["content-length"], "0")

        health = yield get(self.a.http_port, "/healthz")
        self.assertEqual(health.status, 503)
        problem = json.loads(health.body)["problems"]["contexts"]
        self.assertIn("not connected", problem)
        metrics = yield get(self.a.http_port, "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(metrics.body.decode())}
        self.assertEqual(families["rapida_context_store_up"].samples[0].value, 0)
        errors = families["rapida_context_store_errors"].samples
        self.assertEqual([(s.labels["operation"], s.value) for s in errors], [("mint", 1.0)])

        # the live call on B is undisturbed: audio keeps flowing both ways
        live.received.clear()
        send(live, tone(10))
        yield wait_until(lambda: sum(r.payload != SILENCE for r in live.received) >= 10)
        self.assertIn(ctx, self.b.bridge.calls)

        yield self.redis.start()  # same port, empty: the stores reconnect by themselves
        yield wait_until(lambda: self.a.contexts.healthy and self.b.contexts.healthy, timeout=10)
        health = yield get(self.a.http_port, "/healthz")
        self.assertEqual((health.status, json.loads(health.body)["problems"]), (200, {}))
        fresh = yield register(self.a.http_port)
        client = FakeAsterisk(fresh)
        yield connect_audiosocket(self.b.as_port, client)
        yield wait_until(lambda: fresh in self.b.bridge.calls)

        call = self.b.bridge.calls[ctx]
        live.transport.loseConnection()
        self.assertEqual((yield call.when_ended()), reasons.CALLER_HANGUP)
        client.transport.loseConnection()
        yield client.closed
