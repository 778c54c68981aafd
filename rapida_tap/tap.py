"""twistd entry point: ``twistd -n rapida-asterisk [options]``."""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import txaio
from twisted.application import service, strports
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import Resource

from rapida_tap import __version__, tls
from rapida_tap.admission import AUDIOSOCKET_ID_BYTES, AdmissionFactory, DescriptorBudget
from rapida_tap.assistants.config import build_registry, parse_assistants
from rapida_tap.assistants.registry import AssistantRegistry
from rapida_tap.audiosocket.protocol import AudioSocketFactory
from rapida_tap.config import ConfigError, Settings, build_settings, load_toml
from rapida_tap.contexts import MemoryContextStore
from rapida_tap.dialplan import audiosocket_dialplan
from rapida_tap.drain import Drain, DrainState, install_force_signal
from rapida_tap.interfaces import IContextStore
from rapida_tap.media.bridge import MediaBridge
from rapida_tap.media.call import SHUTDOWN
from rapida_tap.metrics import ListenerCollector, NodeCollector, NodeMetrics
from rapida_tap.outbound import OutboundCalls
from rapida_tap.providers import parse_providers
from rapida_tap.ratelimit import RateLimiter
from rapida_tap.redis_store import RedisContextStore, RedisURLError
from rapida_tap.web.admin import DrainResource
from rapida_tap.web.auth import ApiKeys, generate_api_key
from rapida_tap.web.calls import CallsResource
from rapida_tap.web.guard import BodyLimits, GuardedSite
from rapida_tap.web.health import HealthResource
from rapida_tap.web.registration import RegistrationResource
from rapida_tap.web.site import PathTree, make_site, mount
from rapida_tap.websocket.protocol import MediaWebSocketFactory
from rapida_tap.websocket.resource import MediaWebSocketResource

log = Logger(namespace="rapida_tap")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve Asterisk calls (AudioSocket, chan_websocket) to voice-AI assistants. With no"
        " options: AudioSocket on tcp:4573, HTTP on tcp:8080, the echo assistant, in-memory"
        " contexts and a generated API key (logged once). Endpoints are Twisted endpoint strings."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (see etc/rapida-asterisk.toml)."],
        ["audiosocket", None, None, "AudioSocket listener endpoint [default: tcp:4573]."],
        ["http", None, None, "HTTP (registration, ws://, /healthz) endpoint [default: tcp:8080]."],
        [
            "https",
            None,
            None,
            "HTTPS/wss:// endpoint, e.g. ssl:8443:privateKey=key.pem:certKey=cert.pem.",
        ],
        [
            "assistant",
            None,
            None,
            "Default assistant: 'echo' or a ws(s):// bot URL [default: echo].",
        ],
        [
            "contexts",
            None,
            None,
            "Context store: 'memory' or redis://host:6379/0 [default: memory].",
        ],
        [
            "public-url",
            None,
            None,
            "The URL Asterisk reaches this node at (for printed dialplans).",
        ],
        [
            "drain-timeout",
            None,
            None,
            "Seconds live calls may go on after SIGTERM or POST /admin/drain; 0 waits for"
            " every call [default: 0]. A second SIGTERM ends them at once.",
        ],
        [
            "metrics",
            None,
            None,
            "Serve /metrics on this endpoint only (e.g. tcp:9464:interface=127.0.0.1)"
            " [default: /metrics on the HTTP listener].",
        ],
        [
            "api-keys-file",
            None,
            None,
            "File of API keys, one a line (e.g. the systemd credential %d/api-keys).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["api_keys"] = []
        self.settings: Settings | None = None

    def opt_api_key(self, key: str) -> None:
        """An accepted API key; repeatable (also RAPIDA_API_KEYS, comma separated)."""
        self["api_keys"].append(key)

    def opt_version(self) -> None:
        print(f"rapida-asterisk {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        try:
            self.settings = load_settings(self, os.environ)
        except ConfigError as e:
            # One line naming the setting, rather than twistd's whole usage text.
            raise SystemExit(f"rapida-asterisk: {e}") from None


def load_settings(options: usage.Options, environ: Any) -> Settings:
    file_values = load_toml(options["config"]) if options["config"] else {}
    cli = {
        key.replace("-", "_"): options[key]
        for key in (
            "audiosocket",
            "http",
            "https",
            "assistant",
            "contexts",
            "public-url",
            "drain-timeout",
            "metrics",
            "api-keys-file",
        )
    }
    settings = build_settings(file_values, environ, cli, options["api_keys"])
    from twisted.internet import reactor

    if settings.https:
        tls.TlsServerContext(tls.parse_tls_endpoint(settings.https))  # fails early and clearly
    for name in ("audiosocket", "http", "metrics"):
        value = getattr(settings, name)
        if value:
            check_endpoint(reactor, name, value)
    if not settings.api_keys:
        settings.api_keys = [generate_api_key()]
        settings.api_key_generated = True
    return settings


def check_endpoint(reactor: Any, name: str, value: str) -> None:
    """Parse a listener's endpoint string now, so a typo fails start-up with one line.

    ``systemd:`` endpoints are looked up in the sockets systemd passed (``LISTEN_FDS``), so a
    missing or misnamed socket unit is reported here rather than as a bare ``KeyError``.
    """
    try:
        endpoints.serverFromString(reactor, value)
    except (IndexError, KeyError) as e:
        if value.startswith("systemd:"):
            raise ConfigError(
                f"--{name}: {value!r}: systemd passed no such socket ({e}); is the .socket unit "
                "running, and do its FileDescriptorName= values match?"
            ) from None
        raise ConfigError(f"--{name}: {value!r}: {e}") from None
    except Exception as e:
        raise ConfigError(f"--{name}: {value!r}: {e}") from None


def make_context_store(settings: Settings, reactor: Any) -> IContextStore:
    """The memory store, or Redis for ``redis://`` (started and stopped by ``NodeService``)."""
    if settings.contexts == "memory":
        return MemoryContextStore(reactor)
    try:
        return RedisContextStore(reactor, settings.contexts)
    except RedisURLError as e:
        raise ConfigError(f"--contexts: {e}") from None


def make_assistants(settings: Settings, reactor: Any) -> AssistantRegistry:
    spec = parse_assistants(settings.assistants, settings.assistant, os.environ)
    return build_registry(spec, reactor)


class BridgeService(service.Service):
    """Stops taking calls and ends the live ones (none are left after a drain)."""

    def __init__(self, bridge: MediaBridge) -> None:
        self.bridge = bridge

    def stopService(self) -> None:
        super().stopService()
        self.bridge.accepting = False
        self.bridge.end_all(SHUTDOWN)
        self.bridge.pacer.stop()


class ContextStoreService(service.Service):
    """Connects the Redis store at start; closes any store (memory timers, Redis) at stop."""

    def __init__(self, store: IContextStore) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()
        start = getattr(self.store, "start", None)
        if start is not None:
            start()

    def stopService(self) -> Any:
        super().stopService()
        stop = getattr(self.store, "stop", None) or getattr(self.store, "close", None)
        return defer.maybeDeferred(stop) if stop is not None else None


class NodeService(service.MultiService):
    """The whole node.  Stopping it (twistd runs ``stopService`` on SIGTERM, as a "before
    shutdown" trigger whose Deferred the reactor waits for) drains first: no new calls, live
    calls finish within ``drain_timeout``, then the listeners, the outbound calls and the bridge
    stop, and the context store closes last.
    """

    def __init__(self, drain: Drain, store: ContextStoreService, reactor: Any = None) -> None:
        super().__init__()
        self.drain = drain
        self.store = store
        self.reactor = reactor

    def startService(self) -> None:
        self.store.startService()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        d = self.drain.start("stopping")
        if self.reactor is not None and self.drain.state is DrainState.DRAINING:
            d.addBoth(_undo_after(install_force_signal(self.drain, self.reactor)))
        d.addCallback(self._drained)
        d.addCallback(lambda _: service.MultiService.stopService(self))
        d.addBoth(self._close_store)
        return d.addCallback(lambda _: None)

    def _close_store(self, result: Any) -> Any:
        """Close the store whatever happened before, then pass the outcome on."""
        return defer.maybeDeferred(self.store.stopService).addCallback(lambda _: result)

    def _drained(self, _: None) -> None:
        """SIGTERM was handled in full (drained): exit 0, not by the signal.

        twistd re-raises the signal that stopped the reactor once it returns (status 143);
        after a completed drain that signal was a request served, so the daemon exits 0 as
        documented (systemd counts both as a clean stop).
        """
        if getattr(self.reactor, "_exitSignal", None) is not None:
            self.reactor._exitSignal = None


def _undo_after(undo: Callable[[], None]) -> Callable[[Any], Any]:
    def run(result: Any) -> Any:
        undo()
        return result

    return run


class OutboundService(service.Service):
    """Hangs up ringing outbound calls and closes the ARI clients when the daemon stops.

    Added after ``BridgeService``, so it stops first, while contexts still exist.
    """

    def __init__(self, outbound: OutboundCalls) -> None:
        self.outbound = outbound

    def stopService(self) -> Any:
        super().stopService()
        return self.outbound.stop()


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
        self.keys = ApiKeys(settings.api_keys)
        self.audiosocket = AudioSocketFactory(
            self.bridge,
            id_timeout=settings.id_timeout,
            stall_timeout=settings.stall_timeout,
            max_connections=settings.max_connections,
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
        if isinstance(self.contexts, RedisContextStore):
            store = self.contexts
            self.health.checks["contexts"] = lambda: (store.healthy, store.last_error)
            store_healthy = lambda: store.healthy  # noqa: E731
        self.root = PathTree()
        self.root.putChild(b"", Banner())
        mount(self.root, "v1/talk/asterisk/call", self.registration)
        mount(self.root, "v1/talk/asterisk/calls", CallsResource(self.outbound, self.keys))
        mount(self.root, "healthz", self.health)
        self.websocket = MediaWebSocketFactory(
            self.bridge,
            handshake_timeout=settings.ws_handshake_timeout,
            stall_timeout=settings.stall_timeout,
            start_timeout=settings.ws_start_timeout,
            ping_interval=settings.ws_ping_interval,
            max_message=settings.ws_max_message,
            max_text=settings.ws_max_text,
            max_connections=settings.ws_max_connections,
            lead_frames=settings.ws_lead_frames,
        )
        mount(self.root, "v1/talk/asterisk/ctx", MediaWebSocketResource(self.websocket))
        mount(self.root, "admin/drain", DrainResource(self.drain, self.keys, on_drained))
        self.metrics = NodeMetrics(self.bridge)
        self.bridge.contexts = self.metrics.timed_store(self.contexts, reactor)
        self.metrics.add(
            NodeCollector(
                self.bridge,
                replies=self.registration.replies,
                transports={"audiosocket": self.audiosocket, "websocket": self.websocket},
                store_healthy=store_healthy,
            )
        )
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
                {"/v1/talk/asterisk/calls": json_body, "/admin/drain": json_body}
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

    def service(self) -> NodeService:
        top = NodeService(self.drain, ContextStoreService(self.contexts), self.reactor)
        BridgeService(self.bridge).setServiceParent(top)
        OutboundService(self.outbound).setServiceParent(top)
        if self.settings.audiosocket:
            audiosocket = self.admitted(
                "audiosocket", self.audiosocket, self.settings.max_connections, AUDIOSOCKET_ID_BYTES
            )
            strports.service(
                self.settings.audiosocket, audiosocket, reactor=self.reactor
            ).setServiceParent(top)
        limit = self.settings.http_max_connections
        if self.settings.http:
            http = self.admitted("http", self.site, limit)
            strports.service(self.settings.http, http, reactor=self.reactor).setServiceParent(top)
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
            strports.service(self.settings.metrics, metrics, reactor=self.reactor).setServiceParent(
                top
            )
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


def endpoint_port(endpoint: str) -> str:
    """The port of a ``tcp:4573`` / ``tcp:port=4573:interface=…`` / ``ssl:8443:…`` string."""
    match = re.search(r"(?:^|:)(?:port=)?(\d+)(?::|$)", endpoint)
    return match.group(1) if match else "?"


def this_host() -> str:
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return "127.0.0.1"
    return address if not address.startswith("127.") else name


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
    if settings.public_url:
        url = settings.public_url
        host = urlsplit(url).hostname or this_host()
    else:
        host = this_host()
        scheme, endpoint = ("http", settings.http) if settings.http else ("https", settings.https)
        url = f"{scheme}://{host}:{endpoint_port(endpoint)}"
    dialplan = audiosocket_dialplan(
        rapida_url=url,
        api_key=settings.api_keys[0],
        audiosocket_host=host,
        audiosocket_port=endpoint_port(settings.audiosocket),
    )
    log.warn(
        "No API key configured: generated one for this run (it is shown only here): {key}\n"
        "Paste into /etc/asterisk/extensions.conf:\n{dialplan}",
        key=settings.api_keys[0],
        dialplan=dialplan,
    )


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    settings = options.settings
    assert settings is not None
    # Autobahn logs two more lines (info and warn) for every refused handshake, after ours;
    # keep its errors only, so each refusal is one line saying why.
    txaio.set_global_log_level("error")  # type: ignore[attr-defined]  # bound by use_twisted()
    try:
        daemon = Daemon(settings, reactor, on_drained=reactor.stop)
    except ConfigError as e:
        raise SystemExit(f"rapida-asterisk: {e}") from None
    log_start(settings)
    return daemon.service()
