"""One node wired from its settings: the bridge, the listeners, the web site and the services.

``tap.makeService`` builds a ``Daemon`` on the global reactor; tests build one on their own.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

import treq.client
from twisted.internet import defer
from twisted.internet.base import ReactorBase
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource

from rapida_tap import __version__, tls
from rapida_tap.admission import AUDIOSOCKET_ID_BYTES, AdmissionFactory, DescriptorBudget
from rapida_tap.assistants.config import build_registry, parse_assistants
from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.audiosocket.protocol import AudioSocketFactory
from rapida_tap.call_control import CallControl, TransferCollector
from rapida_tap.config import ConfigError, Settings
from rapida_tap.contexts import MemoryContextStore
from rapida_tap.control_rules import policies
from rapida_tap.dialplan import startup_dialplan
from rapida_tap.drain import Drain, DrainState
from rapida_tap.events.config import parse_events
from rapida_tap.events.publisher import CallEvents
from rapida_tap.events.recording import RecordingWriter
from rapida_tap.events.webhooks import WebhookSender
from rapida_tap.interfaces import IContextStore
from rapida_tap.listeners import Listener
from rapida_tap.media.bridge import MediaBridge
from rapida_tap.media.listener import LegListener
from rapida_tap.metrics import EventMetrics, ListenerCollector, NodeCollector, NodeMetrics
from rapida_tap.outbound import OutboundCalls
from rapida_tap.providers import parse_providers
from rapida_tap.ratelimit import RateLimiter
from rapida_tap.redis_url import RedisURLError
from rapida_tap.services import (
    BridgeService,
    CollectorService,
    ContextStoreService,
    EventsService,
    NodeService,
    OutboundService,
)
from rapida_tap.web import twilio_calls
from rapida_tap.web.admin import DrainResource
from rapida_tap.web.auth import ApiKeys
from rapida_tap.web.calls import CallsResource
from rapida_tap.web.guard import BodyLimits, GuardedSite
from rapida_tap.web.health import HealthResource
from rapida_tap.web.registration import RegistrationResource
from rapida_tap.web.site import PathTree, make_site, mount
from rapida_tap.web.transfer import TransferSteps
from rapida_tap.web.twilio_calls import TwilioCallsResource
from rapida_tap.websocket.factory import MediaWebSocketFactory
from rapida_tap.websocket.resource import MediaWebSocketResource

log = Logger(namespace="rapida_tap")


def poll_without_waiting(reactor: Any) -> Callable[[], None] | None:
    """The reactor's own poll with no wait (epoll, poll, select), for the pacer to read the
    sockets before each tick; None for a reactor without one (asyncio, a test clock)."""
    do_iteration = getattr(type(reactor), "doIteration", None)
    if do_iteration is None or do_iteration is ReactorBase.doIteration:
        return None
    return lambda: reactor.doIteration(0)


def make_context_store(settings: Settings, reactor: Any) -> IContextStore:
    """The memory store, or Redis for ``redis://`` (started and stopped by ``NodeService``)."""
    if settings.contexts == "memory":
        return MemoryContextStore(reactor)
    from rapida_tap.redis_store import RedisContextStore  # txredisapi: only where it is used

    try:
        return RedisContextStore(reactor, settings.contexts)
    except RedisURLError as e:
        raise ConfigError(f"--contexts: {e}") from None


def make_assistants(settings: Settings, reactor: Any) -> AssistantRegistry:
    spec = parse_assistants(settings.assistants, settings.assistant, os.environ)
    return build_registry(spec, reactor)


def make_events(
    settings: Settings,
    reactor: Any,
    bridge: MediaBridge,
    outbound: OutboundCalls,
    metrics: EventMetrics,
    pool: HTTPConnectionPool,
) -> CallEvents:
    """Webhooks and recordings, subscribed to the bridge and the outbound service."""
    spec = parse_events(settings.webhooks, settings.assistants, os.environ)
    sender = WebhookSender(
        treq.client.HTTPClient(Agent(reactor, pool=pool)),
        reactor,
        max_pending=settings.webhook_max_pending,
        observer=metrics,
    )
    writer = None
    if spec.records_any:
        check_writable(settings.recordings_dir)
        writer = RecordingWriter(reactor.callFromThread)
    return CallEvents(
        bridge,
        spec,
        clock=reactor,
        sender=sender,
        writer=writer,
        recordings_dir=settings.recordings_dir,
        recording_name=settings.recording_name,
        outbound=outbound,
        metrics=metrics,
    )


def check_writable(directory: str) -> None:
    """Recordings fail at start-up, in one line, rather than on the first recorded call."""
    try:
        os.makedirs(directory, mode=0o750, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"recordings_dir: cannot create {directory}: {e.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"recordings_dir: {directory} is not writable by this user")


class Daemon:
    """Everything one node runs, built from settings; tests build it with their own reactor."""

    def __init__(
        self, settings: Settings, reactor: Any, on_drained: Callable[[], None] | None = None
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        self.contexts = make_context_store(settings, reactor)
        self.bridge = MediaBridge(
            clock=reactor,
            contexts=self.contexts,  # timed for metrics below
            assistants=make_assistants(settings, reactor),
            idle_timeout=settings.idle_timeout,
        )
        self.bridge.pacer.read_pending = poll_without_waiting(reactor)
        self.keys = ApiKeys(settings.api_keys)
        self.audiosocket = AudioSocketFactory(
            LegListener(
                self.bridge,
                "audiosocket",
                stall_timeout=settings.stall_timeout,
                max_connections=settings.max_connections,
            ),
            id_timeout=settings.id_timeout,
            max_audio_payload=settings.max_audio_payload,
        )
        self.registration = RegistrationResource(
            self.bridge,
            self.keys,
            RateLimiter(settings.rate_limit, settings.rate_burst),
            context_ttl=settings.context_ttl,
        )
        self.outbound = OutboundCalls(
            self.bridge,
            parse_providers(settings.providers, os.environ),
            clock=reactor,
            ring_timeout=settings.ring_timeout,
            check_interval=settings.ring_check_interval,
        )
        self.drain = Drain(self.bridge, reactor, settings.drain_timeout)
        self.health = HealthResource(self.bridge)
        self.health.checks["drain"] = self._drain_check
        store_healthy: Callable[[], bool] | None = None
        if not isinstance(self.contexts, MemoryContextStore):
            store: Any = self.contexts  # Redis: its connection's health is the node's
            self.health.checks["contexts"] = lambda: (store.healthy, store.last_error)
            store_healthy = lambda: store.healthy  # noqa: E731
        self.root = PathTree()
        self.root.putChild(b"", Banner())
        mount(self.root, "v1/talk/asterisk/call", self.registration)
        mount(self.root, "healthz", self.health)
        self.websocket = MediaWebSocketFactory(
            LegListener(
                self.bridge,
                "websocket",
                stall_timeout=settings.stall_timeout,
                ping_interval=settings.ws_ping_interval,
                max_connections=settings.ws_max_connections,
            ),
            handshake_timeout=settings.ws_handshake_timeout,
            start_timeout=settings.ws_start_timeout,
            max_message=settings.ws_max_message,
            max_text=settings.ws_max_text,
            lead_frames=settings.ws_lead_frames,
        )
        mount(self.root, "v1/talk/asterisk/ctx", MediaWebSocketResource(self.websocket))
        mount(self.root, "admin/drain", DrainResource(self.drain, self.keys, on_drained))
        self.metrics = NodeMetrics(self.bridge)
        self.bridge.contexts = self.metrics.timed_store(self.contexts, reactor)
        self.node_id = uuid.uuid4().hex[:16]
        self.control = CallControl(
            self.bridge,
            node_id=self.node_id,
            clock=reactor,
            policy_of=policies(
                parse_assistants(settings.assistants, settings.assistant, os.environ),
                settings.transfer_endpoint,
                settings.transfer_sip_endpoint,
            ),
            context_ttl=settings.context_ttl,
        )
        self.control.follow_outbound(self.outbound)
        self.control.start()
        self.registration.transfer_steps = TransferSteps(self.control, self.keys)
        mount(
            self.root,
            "v1/talk/asterisk/calls",
            CallsResource(self.outbound, self.keys, self.control),
        )
        mount(self.root, twilio_calls.PATH, TwilioCallsResource(self.control, self.keys))
        self.metrics.add(TransferCollector(self.control))
        self.metrics.add(
            NodeCollector(
                self.bridge,
                replies=self.registration.replies,
                transports={
                    "audiosocket": self.audiosocket.listener,
                    "websocket": self.websocket.listener,
                },
                store_healthy=store_healthy,
            )
        )
        self.webhook_pool = HTTPConnectionPool(reactor, persistent=True)
        self.webhook_pool.maxPersistentPerHost = 4
        self.events = make_events(
            settings, reactor, self.bridge, self.outbound, self.metrics.events, self.webhook_pool
        )
        self.control.transfer_reported.append(self.events.transferred)
        self.metrics_site: GuardedSite | None = None
        if settings.metrics:
            metrics_root = PathTree()
            mount(metrics_root, "metrics", self.metrics.resource())
            self.metrics_site = make_site(metrics_root, head_timeout=settings.http_head_timeout)
        else:
            mount(self.root, "metrics", self.metrics.resource())
        self.tls: tls.TlsServerContext | None = None
        if settings.https:
            self.tls_spec = tls.parse_tls_endpoint(settings.https)
            self.tls = tls.TlsServerContext(self.tls_spec)
        json_body = settings.http_max_body  # the JSON APIs; every other path takes no body
        self.site = make_site(
            self.root,
            head_timeout=settings.http_head_timeout,
            body_limits=BodyLimits(
                {
                    "/v1/talk/asterisk/calls": json_body,
                    "/admin/drain": json_body,
                    f"/{twilio_calls.PATH}": twilio_calls.MAX_FORM,
                }
            ),
        )
        self.descriptors = DescriptorBudget()
        self.listeners: dict[str, AdmissionFactory] = {}
        sites = {"main": self.site}
        if self.metrics_site is not None:
            sites["metrics"] = self.metrics_site
        self.metrics.add(ListenerCollector(self.listeners, sites))

    def _drain_check(self) -> tuple[bool, str]:
        if self.drain.state is DrainState.SERVING:
            return True, ""
        if self.drain.state is DrainState.DRAINED:
            return False, "drained"
        left = self.drain.remaining
        return False, f"draining: {len(self.bridge.calls)} call(s) left, " + (
            "waiting for every call" if left is None else f"{left:.0f} s until they are ended"
        )

    def admitted(
        self, name: str, factory: Any, max_connections: int, pending_bytes: int = 0
    ) -> Any:
        """``factory`` behind this node's connection caps and accept rate (rapida_tap.admission)."""
        s = self.settings
        admission = AdmissionFactory(
            factory,
            name=name,
            clock=self.reactor,
            budget=self.descriptors,
            max_connections=max_connections,
            max_pending_per_address=s.max_pending_per_address,
            accept_rate=s.accept_rate,
            accept_burst=s.accept_burst,
            pending_bytes=pending_bytes,
        )
        self.listeners[name] = admission
        return admission

    def stop_events(self) -> defer.Deferred[None]:
        """After the calls ended: recordings finalised, webhooks flushed, connections closed."""
        d = self.events.stop(self.settings.webhook_flush_timeout)
        d.addBoth(lambda _: self.webhook_pool.closeCachedConnections())
        return d.addCallback(lambda _: None)

    def service(self) -> NodeService:
        top = NodeService(self.drain, ContextStoreService(self.contexts), self.reactor)
        CollectorService(self.reactor, self.metrics.observe_gc_pause).setServiceParent(top)
        EventsService(self.stop_events).setServiceParent(top)  # stops last: after the calls
        BridgeService(self.bridge).setServiceParent(top)
        OutboundService(self.outbound).setServiceParent(top)
        settings = self.settings
        if settings.audiosocket:
            audiosocket = self.admitted(
                "audiosocket", self.audiosocket, settings.max_connections, AUDIOSOCKET_ID_BYTES
            )
            Listener(
                self.reactor, "audiosocket", settings.audiosocket, audiosocket
            ).setServiceParent(top)
        limit = settings.http_max_connections
        if settings.http:
            http = self.admitted("http", self.site, limit)
            Listener(self.reactor, "http", settings.http, http).setServiceParent(top)
        if self.tls is not None:
            tls.TlsListener(
                self.reactor,
                self.tls_spec,
                self.tls,
                self.site,
                admission=lambda factory: self.admitted("https", factory, limit),
            ).setServiceParent(top)
        if self.metrics_site is not None:
            metrics = self.admitted("metrics", self.metrics_site, limit)
            Listener(self.reactor, "metrics", settings.metrics, metrics).setServiceParent(top)
        return top


class Banner(Resource):
    """``GET /``: a connectivity check (``curl https://host/``) that names the service."""

    isLeaf = True
    body = b"rapida-asterisk\n"

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return self.body

    def render_HEAD(self, request: Any) -> bytes:
        """``curl -I``: the headers of a GET, no body (twisted.web warns about one)."""
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"content-length", b"%d" % len(self.body))
        return b""


def log_start(settings: Settings) -> None:
    log.info(
        "rapida-asterisk {version}: audiosocket={audiosocket} http={http} https={https} "
        "assistant={assistant} contexts={contexts} metrics={metrics} "
        "drain_timeout={drain_timeout}",
        version=__version__,
        audiosocket=settings.audiosocket or "off",
        http=settings.http or "off",
        https=settings.https or "off",
        assistant=parse_assistants(settings.assistants, settings.assistant, os.environ).describe(),
        contexts=settings.contexts.split("@")[-1],
        metrics=settings.metrics or "/metrics on http",
        drain_timeout=f"{settings.drain_timeout:g}s" if settings.drain_timeout else "none",
    )
    if not settings.api_key_generated:
        return
    dialplan = startup_dialplan(settings)
    log.warn(
        "No API key configured: generated one for this run (it is shown only here): {key}\n"
        "Paste into /etc/asterisk/extensions.conf:\n{dialplan}",
        key=settings.api_keys[0],
        dialplan=dialplan,
    )
