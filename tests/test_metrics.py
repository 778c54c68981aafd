"""/metrics, scraped over HTTP after real calls, parsed with Prometheus' own parser."""

from __future__ import annotations

import uuid
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rapida_tap.assistants.echo import EchoAssistant
from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.contexts import CallContext, ContextStoreUnavailable, MemoryContextStore
from rapida_tap.media.bridge import MediaBridge
from rapida_tap.metrics import NodeMetrics
from tests.support import (
    FakeAsterisk,
    connect_audiosocket,
    curl_get,
    raw_http,
    register,
    start_daemon,
    tone,
    wait_until,
)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of an exposition; fails on a malformed one."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def memory_bridge(clock: Clock, store: MemoryContextStore) -> MediaBridge:
    return MediaBridge(
        clock=clock, contexts=store, assistants=AssistantRegistry(default=EchoAssistant())
    )


@defer.inlineCallbacks
def scrape(port: int, accept: str | None = None) -> Any:
    headers = {"Connection": "close"}
    if accept:
        headers["Accept"] = accept
    reply = yield raw_http(port, curl_get("/metrics", headers=headers))
    return reply


class MetricsOverHttpTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.daemon = start_daemon(self)

    @defer.inlineCallbacks
    def test_calls_frames_registrations_refusals_and_latency(self) -> Any:
        port = self.daemon.http_port
        ctx = yield register(port)
        client = FakeAsterisk(ctx, tone(25))
        yield connect_audiosocket(self.daemon.as_port, client)
        yield client.sent_all
        yield wait_until(lambda: len(client.received) >= 30)

        reply = yield scrape(port)
        self.assertEqual(reply.status, 200)
        self.assertTrue(reply.headers["content-type"].startswith("text/plain; version=0.0.4"))
        live = samples(reply.body.decode())
        self.assertEqual(live[("rapida_calls_active", (("transport", "audiosocket"),))], 1)
        self.assertEqual(live[("rapida_accepting", ())], 1)
        self.assertGreaterEqual(
            live[("rapida_call_frames_total", (("direction", "in"), ("transport", "audiosocket")))],
            25,  # counted from the live call's own counter
        )

        call = self.daemon.bridge.calls[ctx]
        client.transport.loseConnection()
        yield wait_until(lambda: not self.daemon.bridge.calls)
        bad = yield raw_http(
            port, curl_get("/v1/talk/asterisk/call/x", headers={"X-Api-Key": "no"})
        )
        self.assertEqual(bad.status, 401)
        stray = FakeAsterisk(str(uuid.uuid4()))
        yield connect_audiosocket(self.daemon.as_port, stray)
        yield stray.closed

        reply = yield scrape(port)
        m = samples(reply.body.decode())
        audiosocket = (("transport", "audiosocket"),)
        self.assertEqual(m[("rapida_calls_active", audiosocket)], 0)
        self.assertEqual(m[("rapida_calls_started_total", audiosocket)], 1)
        ended = (("reason", "caller-hangup"), ("transport", "audiosocket"))
        self.assertEqual(m[("rapida_calls_ended_total", ended)], 1)
        frames_in = m[("rapida_call_frames_total", (("direction", "in"), *audiosocket))]
        frames_out = m[("rapida_call_frames_total", (("direction", "out"), *audiosocket))]
        self.assertEqual((frames_in, frames_out), (25, 25))  # kept after the call ended: echo
        # the call's own count (a real-reactor echo may legitimately have one)
        self.assertEqual(m[("rapida_call_underruns_total", audiosocket)], call.underruns)
        self.assertEqual(m[("rapida_registrations_total", (("status", "200"),))], 1)
        self.assertEqual(m[("rapida_registrations_total", (("status", "401"),))], 1)
        refused = (("reason", "context-unknown"), ("transport", "audiosocket"))
        self.assertEqual(m[("rapida_connections_refused_total", refused)], 1)
        self.assertEqual(m[("rapida_calls_active", (("transport", "websocket"),))], 0)
        self.assertGreater(m[("rapida_pacer_ticks_total", ())], 25)
        self.assertGreater(m[("rapida_pacer_tick_lateness_seconds_count", ())], 25)
        mint_ok = (("operation", "mint"), ("outcome", "ok"))
        claim_ok = (("operation", "claim"), ("outcome", "ok"))
        unknown = (("operation", "claim"), ("outcome", "context-unknown"))
        self.assertEqual(m[("rapida_context_store_seconds_count", mint_ok)], 1)
        self.assertEqual(m[("rapida_context_store_seconds_count", claim_ok)], 1)
        self.assertEqual(m[("rapida_context_store_seconds_count", unknown)], 1)
        self.assertNotIn(("rapida_context_store_up", ()), m)  # memory store: nothing to be down
        self.assertIn(("rapida_info", (("version", __import__("rapida_tap").__version__),)), m)

    @defer.inlineCallbacks
    def test_openmetrics_when_asked_and_draining_shows(self) -> Any:
        yield self.daemon.drain.start("test")
        reply = yield scrape(self.daemon.http_port, accept="application/openmetrics-text")
        self.assertTrue(reply.headers["content-type"].startswith("application/openmetrics-text"))
        self.assertTrue(reply.body.endswith(b"# EOF\n"))
        self.assertIn(b"rapida_accepting 0.0", reply.body)

    def test_each_daemon_has_its_own_registry(self) -> None:
        other = start_daemon(self)
        self.assertIsNot(other.metrics.registry, self.daemon.metrics.registry)


class SeparateEndpointTests(TestCase):
    @defer.inlineCallbacks
    def test_metrics_option_moves_metrics_off_the_public_site(self) -> Any:
        daemon = start_daemon(self, metrics="tcp:0")
        reply = yield scrape(daemon.http_port)
        self.assertEqual((reply.status, reply.body), (404, b""))
        assert daemon.metrics_site is not None
        port = reactor.listenTCP(0, daemon.metrics_site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        reply = yield scrape(port.getHost().port)
        self.assertEqual(reply.status, 200)
        self.assertIn(b"rapida_calls_active", reply.body)


class StoreTimingTests(SynchronousTestCase):
    """Latency is measured on the injected clock; failures count as errors, refusals do not."""

    def test_latency_outcomes_and_errors(self) -> None:
        clock = Clock()
        store = MemoryContextStore(clock)
        metrics = NodeMetrics(memory_bridge(clock, store))
        timed = metrics.timed_store(store, clock)
        slow: defer.Deferred[Any] = defer.Deferred()
        store.mint = lambda context, ttl: slow  # type: ignore[method-assign]
        d = timed.mint(CallContext("c1", "a"), 30)
        clock.advance(0.003)
        slow.callback("c1")
        self.assertEqual(self.successResultOf(d), "c1")
        self.failureResultOf(timed.claim("nope"))
        store.get = lambda cid: defer.fail(ContextStoreUnavailable("down"))  # type: ignore[method-assign]
        self.failureResultOf(timed.get("x"), ContextStoreUnavailable)
        store.close()
        registry = metrics.registry
        value = registry.get_sample_value
        labels = {"operation": "mint", "outcome": "ok"}
        self.assertEqual(value("rapida_context_store_seconds_count", labels), 1)
        self.assertAlmostEqual(value("rapida_context_store_seconds_sum", labels), 0.003)
        self.assertEqual(
            value("rapida_context_store_seconds_bucket", {**labels, "le": "0.0025"}), 0
        )
        self.assertEqual(value("rapida_context_store_seconds_bucket", {**labels, "le": "0.005"}), 1)
        refused = {"operation": "claim", "outcome": "context-unknown"}
        self.assertEqual(value("rapida_context_store_seconds_count", refused), 1)
        self.assertIsNone(value("rapida_context_store_errors_total", {"operation": "claim"}))
        self.assertEqual(value("rapida_context_store_errors_total", {"operation": "get"}), 1)

    def test_pacer_lateness_is_observed_per_tick_and_never_negative(self) -> None:
        clock = Clock()
        bridge = memory_bridge(clock, MemoryContextStore(clock))
        metrics = NodeMetrics(bridge)
        assert bridge.pacer.lateness_observer is not None
        bridge.pacer.lateness_observer(-0.0005)  # fired early, as the pacer aims to
        bridge.pacer.lateness_observer(0.03)
        value = metrics.registry.get_sample_value
        self.assertEqual(value("rapida_pacer_tick_lateness_seconds_count"), 2)
        self.assertEqual(value("rapida_pacer_tick_lateness_seconds_bucket", {"le": "0.001"}), 1)
        self.assertEqual(value("rapida_pacer_tick_lateness_seconds_bucket", {"le": "0.02"}), 1)
        self.assertAlmostEqual(value("rapida_pacer_tick_lateness_seconds_sum"), 0.03)

    def test_garbage_collection_pauses_are_a_histogram_by_generation(self) -> None:
        clock = Clock()
        metrics = NodeMetrics(memory_bridge(clock, MemoryContextStore(clock)))
        metrics.observe_gc_pause(2, 0.035)
        metrics.observe_gc_pause(0, 0.00002)
        value = metrics.registry.get_sample_value
        full, young = {"generation": "2"}, {"generation": "0"}
        self.assertEqual(value("rapida_gc_pause_seconds_count", full), 1)
        self.assertEqual(value("rapida_gc_pause_seconds_bucket", {**full, "le": "0.02"}), 0)
        self.assertEqual(value("rapida_gc_pause_seconds_bucket", {**full, "le": "0.05"}), 1)
        self.assertEqual(value("rapida_gc_pause_seconds_bucket", {**young, "le": "0.0001"}), 1)
        self.assertEqual(value("rapida_gc_pause_seconds_count", {"generation": "1"}), 0)
