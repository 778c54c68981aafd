"""Prometheus metrics of one node, in a registry of its own (tests build several daemons).

Per-frame cost is zero: frames, underruns, refusals and replies are read at scrape time from the
counters the bridge, the calls and the transports keep anyway (``NodeCollector``).  What is
recorded as it happens is per call (started/ended, from the bridge's hooks), per pacer tick
(lateness, 50 a second whatever the number of calls) and per context store command (latency).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from zope.interface import implementer

from rapida_tap import __version__
from rapida_tap.interfaces import IContextStore
from rapida_tap.reasons import CallRefused

if TYPE_CHECKING:  # pragma: no cover
    from twisted.web.server import Request

    from rapida_tap.contexts import CallContext
    from rapida_tap.media.bridge import MediaBridge
    from rapida_tap.media.call import Call

#: seconds; a tick is due every 20 ms, so 20 ms late is one lost frame interval
LATENESS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.1, 0.5, 1.0)
#: seconds; a local Redis answers in well under a millisecond, the command timeout is 1 s
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: seconds; a young generation takes microseconds, a full collection of a large heap tens of ms
GC_PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)


class _Totals:
    """Frame counts of ended calls, per transport (live calls are added at scrape time)."""

    __slots__ = ("frames_in", "frames_out", "overflow_frames", "underruns")

    def __init__(self) -> None:
        self.frames_in = self.frames_out = self.underruns = self.overflow_frames = 0

    def add(self, counts: Call | _Totals) -> None:
        self.frames_in += counts.frames_in
        self.frames_out += counts.frames_out
        self.underruns += counts.underruns
        self.overflow_frames += counts.overflow_frames


class NodeCollector(Collector):
    """Reads the node's own counters when Prometheus scrapes.

    ``transports`` maps a transport name to its ``LegListener`` (``connections``, ``refused``);
    ``replies`` is registration's status -> count; ``store_healthy`` (optional) says whether
    the context store is reachable; ``accepting`` whether the node takes new calls.
    """

    def __init__(
        self,
        bridge: MediaBridge,
        *,
        replies: dict[int, int],
        transports: dict[str, Any],
        store_healthy: Callable[[], bool] | None = None,
    ) -> None:
        self._bridge = bridge
        self._replies = replies
        self._transports = transports
        self._store_healthy = store_healthy
        self.started: dict[str, int] = {}
        self.ended: dict[tuple[str, str], int] = {}
        self._ended_totals: dict[str, _Totals] = {}
        bridge.call_started.append(self._call_started)
        bridge.call_ended.append(self._call_ended)

    def _call_started(self, call: Call) -> None:
        name = call.leg.transport_name
        self.started[name] = self.started.get(name, 0) + 1

    def _call_ended(self, call: Call) -> None:
        name = call.leg.transport_name
        key = (name, call.end_reason or "unknown")
        self.ended[key] = self.ended.get(key, 0) + 1
        self._ended_totals.setdefault(name, _Totals()).add(call)

    def collect(self) -> Iterator[Metric]:
        bridge = self._bridge
        info = GaugeMetricFamily("rapida_info", "This daemon's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "rapida_accepting",
            "1 while the node takes new calls, 0 while draining or stopping.",
            value=1 if bridge.accepting else 0,
        )
        if self._store_healthy is not None:
            yield GaugeMetricFamily(
                "rapida_context_store_up",
                "1 while the shared context store (Redis) answers.",
                value=1 if self._store_healthy() else 0,
            )

        names = set(self._transports) | set(self.started)
        active: dict[str, int] = dict.fromkeys(names, 0)
        totals = {name: _Totals() for name in names}
        for name, ended in self._ended_totals.items():
            totals.setdefault(name, _Totals()).add(ended)
        for call in list(bridge.calls.values()):
            name = call.leg.transport_name
            active[name] = active.get(name, 0) + 1
            totals.setdefault(name, _Totals()).add(call)

        g = GaugeMetricFamily("rapida_calls_active", "Calls in progress.", labels=["transport"])
        for name in sorted(active):
            g.add_metric([name], active[name])
        yield g
        c = CounterMetricFamily("rapida_calls_started", "Calls started.", labels=["transport"])
        for name in sorted(names):
            c.add_metric([name], self.started.get(name, 0))
        yield c
        c = CounterMetricFamily(
            "rapida_calls_ended", "Calls ended, by end reason.", labels=["transport", "reason"]
        )
        for (name, reason), count in sorted(self.ended.items()):
            c.add_metric([name, reason], count)
        yield c

        frames = CounterMetricFamily(
            "rapida_call_frames",
            "20 ms audio frames from Asterisk (in) and to Asterisk (out).",
            labels=["transport", "direction"],
        )
        underruns = CounterMetricFamily(
            "rapida_call_underruns",
            "Times assistant audio resumed after the queue ran dry mid-speech.",
            labels=["transport"],
        )
        overflow = CounterMetricFamily(
            "rapida_call_overflow_frames",
            "Assistant frames dropped because a call's queue was full.",
            labels=["transport"],
        )
        for name in sorted(totals):
            t = totals[name]
            frames.add_metric([name, "in"], t.frames_in)
            frames.add_metric([name, "out"], t.frames_out)
            underruns.add_metric([name], t.underruns)
            overflow.add_metric([name], t.overflow_frames)
        yield frames
        yield underruns
        yield overflow

        c = CounterMetricFamily(
            "rapida_registrations", "Registration replies, by HTTP status.", labels=["status"]
        )
        for status, count in sorted(self._replies.items()):
            c.add_metric([str(status)], count)
        yield c

        conns = GaugeMetricFamily(
            "rapida_connections", "Open media connections.", labels=["transport"]
        )
        refused = CounterMetricFamily(
            "rapida_connections_refused",
            "Media connections refused before a call started, by reason.",
            labels=["transport", "reason"],
        )
        for name, listener in sorted(self._transports.items()):
            conns.add_metric([name], listener.connections)
            for reason, count in sorted(listener.refused.items()):
                refused.add_metric([name, reason], count)
        yield conns
        yield refused

        pacer = bridge.pacer
        for suffix, value, text in [
            ("ticks", pacer.ticks, "Pacer ticks (one per 20 ms while any call is live)."),
            ("late_ticks", pacer.late_ticks, "Ticks that fired one or more intervals late."),
            ("skipped_ticks", pacer.skipped_ticks, "Ticks given up after a long stall."),
        ]:
            yield CounterMetricFamily(f"rapida_pacer_{suffix}", text, value=value)


class ListenerCollector(Collector):
    """Connections and refusals at the node's edges, read at scrape time.

    ``listeners`` maps a listener name to its ``rapida_tap.admission.AdmissionFactory``
    (``connections``, ``refused``); ``sites`` a site name to its ``GuardedSite``
    (``refused``: HTTP requests refused by ``rapida_tap.web.guard``).  Both are read as they
    are when scraped, so listeners added after this collector are included.
    """

    def __init__(self, listeners: dict[str, Any], sites: dict[str, Any]) -> None:
        self._listeners = listeners
        self._sites = sites

    def collect(self) -> Iterator[Metric]:
        conns = GaugeMetricFamily(
            "rapida_listener_connections", "Open connections, by listener.", labels=["listener"]
        )
        refused = CounterMetricFamily(
            "rapida_listener_refused",
            "Connections closed at accept (caps, descriptor budget, accept rate), by reason.",
            labels=["listener", "reason"],
        )
        for name, admission in sorted(self._listeners.items()):
            conns.add_metric([name], admission.connections)
            for reason, count in sorted(admission.refused.items()):
                refused.add_metric([name, reason], count)
        yield conns
        yield refused
        http_refused = CounterMetricFamily(
            "rapida_http_refused",
            "HTTP requests refused before a resource ran (deadline, body size, malformed).",
            labels=["site", "reason"],
        )
        for name, site in sorted(self._sites.items()):
            for reason, count in sorted(site.refused.items()):
                http_refused.add_metric([name, reason], count)
        yield http_refused


@implementer(IContextStore)
class TimedContextStore:
    """An ``IContextStore`` that times another one: latency by operation and outcome.

    The outcome is ``ok``, the refusal's ``reason`` (``context-unknown``, ``context-reused``,
    ``context-store-unavailable``…) or ``error``.  Unavailability and unexpected failures also
    count in ``rapida_context_store_errors_total``; refusals are answers, not errors.
    """

    def __init__(
        self, store: IContextStore, clock: IReactorTime, latency: Histogram, errors: Counter
    ) -> None:
        self.store = store
        self._clock = clock
        self._latency = latency
        self._errors = errors
        # The histogram of each (operation, outcome), looked up once: ``labels()`` takes a
        # lock and checks its arguments on every call, several times per call set-up.
        self._latency_of: dict[tuple[str, str], Any] = {}

    def mint(self, context: CallContext, ttl: float) -> defer.Deferred[str]:
        return self._timed("mint", self.store.mint, context, ttl)

    def claim(self, context_id: str) -> defer.Deferred[CallContext]:
        return self._timed("claim", self.store.claim, context_id)

    def get(self, context_id: str) -> defer.Deferred[CallContext | None]:
        return self._timed("get", self.store.get, context_id)

    def discard(self, context_id: str) -> defer.Deferred[None]:
        return self._timed("discard", self.store.discard, context_id)

    def update_call(
        self, context_id: str, fields: Mapping[str, str], ttl: float
    ) -> defer.Deferred[None]:
        return self._timed("update", self.store.update_call, context_id, fields, ttl)

    def load_call(self, context_id: str) -> defer.Deferred[dict[str, str]]:
        return self._timed("load", self.store.load_call, context_id)

    def claim_call_field(self, context_id: str, field: str, value: str) -> defer.Deferred[bool]:
        return self._timed("update", self.store.claim_call_field, context_id, field, value)

    def publish(self, channel: str, message: str) -> defer.Deferred[int]:
        return self._timed("publish", self.store.publish, channel, message)

    def listen(self, channel: str, handler: Callable[[str], None]) -> None:
        self.store.listen(channel, handler)

    def _timed(self, operation: str, method: Callable[..., Any], *args: Any) -> Any:
        started = self._clock.seconds()
        d: defer.Deferred[Any] = defer.maybeDeferred(method, *args)

        def done(result: Any) -> Any:
            outcome = "ok"
            if isinstance(result, Failure):
                refused = result.value
                outcome = refused.reason if isinstance(refused, CallRefused) else "error"
                if outcome in ("error", "context-store-unavailable"):
                    self._errors.labels(operation).inc()
            elapsed = max(0.0, self._clock.seconds() - started)
            latency = self._latency_of.get((operation, outcome))
            if latency is None:
                latency = self._latency_of[operation, outcome] = self._latency.labels(
                    operation, outcome
                )
            latency.observe(elapsed)
            return result

        return d.addBoth(done)


#: seconds from an event to its receiver's 2xx (retries are minutes apart)
WEBHOOK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 150.0)
#: seconds, per call: first-audio latency, barge-in (clear to silence) latency
CALL_LATENCY_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class EventMetrics:
    """Webhook deliveries, recordings, and each ended call's quality report, summarised.

    Fed as things happen: once per delivery outcome, once per recording, once per call.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "rapida_webhook_deliveries",
            "Webhook deliveries by outcome: delivered (2xx), failed (refused, or every try "
            "failed), dropped (the queue was full).",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.delivery_seconds = Histogram(
            "rapida_webhook_delivery_seconds",
            "From an event to its receiver's 2xx answer, retries included.",
            ["endpoint"],
            buckets=WEBHOOK_BUCKETS,
            registry=registry,
        )
        self.recordings = Counter(
            "rapida_recordings",
            "Call recordings by outcome: completed, or stopped early (slow or full disk).",
            ["outcome"],
            registry=registry,
        )
        self.first_audio = Histogram(
            "rapida_call_first_audio_seconds",
            "Per call: from the first caller frame to the first assistant frame played.",
            ["transport"],
            buckets=CALL_LATENCY_BUCKETS,
            registry=registry,
        )
        self.barge_in = Histogram(
            "rapida_call_barge_in_seconds",
            "Per call with a barge-in: the longest time from a clear to silence.",
            ["transport"],
            buckets=LATENESS_BUCKETS,
            registry=registry,
        )
        self.pacing_p99 = Histogram(
            "rapida_call_pacing_error_p99_seconds",
            "Per call: the 99th percentile of how late its ticks were against the 20 ms grid.",
            ["transport"],
            buckets=LATENESS_BUCKETS,
            registry=registry,
        )
        self.call_events = Counter(
            "rapida_call_events",
            "Per-call counts from the quality reports of ended calls: barge_ins, dtmf, xoff, "
            "silence_frames, trimmed_frames, dropped_frames, marks_sent.",
            ["transport", "kind"],
            registry=registry,
        )

    def delivered(self, endpoint: str, seconds: float) -> None:
        self.deliveries.labels(endpoint, "delivered").inc()
        self.delivery_seconds.labels(endpoint).observe(seconds)

    def failed(self, endpoint: str) -> None:
        self.deliveries.labels(endpoint, "failed").inc()

    def dropped(self, endpoint: str) -> None:
        self.deliveries.labels(endpoint, "dropped").inc()

    def recording(self, outcome: str) -> None:
        self.recordings.labels(outcome).inc()

    def call_quality(self, report: dict[str, Any]) -> None:
        transport = str(report["transport"])
        if report["first_audio_ms"] is not None:
            self.first_audio.labels(transport).observe(report["first_audio_ms"] / 1000)
        if report["barge_in_ms_max"] is not None:
            self.barge_in.labels(transport).observe(report["barge_in_ms_max"] / 1000)
        if report["pacing_error_p99_ms"] is not None:
            self.pacing_p99.labels(transport).observe(report["pacing_error_p99_ms"] / 1000)
        for kind in _SUMMED:
            if report[kind]:
                self.call_events.labels(transport, kind).inc(report[kind])


_SUMMED = (
    "barge_ins",
    "dtmf",
    "xoff",
    "silence_frames",
    "trimmed_frames",
    "dropped_frames",
    "marks_sent",
)


class NodeMetrics:
    """The registry of one node and what feeds it; ``resource`` serves it."""

    def __init__(self, bridge: MediaBridge) -> None:
        self.registry = CollectorRegistry()
        self.tick_lateness = Histogram(
            "rapida_pacer_tick_lateness_seconds",
            "How late each pacer tick fired after its deadline on the 20 ms grid.",
            buckets=LATENESS_BUCKETS,
            registry=self.registry,
        )
        self.store_latency = Histogram(
            "rapida_context_store_seconds",
            "Context store command latency, by operation and outcome.",
            ["operation", "outcome"],
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.store_errors = Counter(
            "rapida_context_store_errors",
            "Context store commands that failed (unreachable, timed out, unexpected).",
            ["operation"],
            registry=self.registry,
        )
        self.gc_pause = Histogram(
            "rapida_gc_pause_seconds",
            "How long each garbage collection stopped the process, by generation (2: full).",
            ["generation"],
            buckets=GC_PAUSE_BUCKETS,
            registry=self.registry,
        )
        self._gc_pauses = [self.gc_pause.labels(str(g)) for g in range(3)]
        self.events = EventMetrics(self.registry)
        observe = self.tick_lateness.observe
        bridge.pacer.lateness_observer = lambda late: observe(late if late > 0 else 0.0)

    def observe_gc_pause(self, generation: int, seconds: float) -> None:
        self._gc_pauses[generation].observe(seconds)

    def timed_store(self, store: IContextStore, clock: IReactorTime) -> TimedContextStore:
        return TimedContextStore(store, clock, self.store_latency, self.store_errors)

    def add(self, collector: Collector) -> None:
        self.registry.register(collector)

    def resource(self) -> MetricsResource:
        return MetricsResource(self.registry)


class MetricsResource(Resource):
    """``GET /metrics``: the Prometheus text format (OpenMetrics if the scraper asks for it)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return encoder(self._registry)
